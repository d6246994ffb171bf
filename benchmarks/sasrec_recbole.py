"""SASRec from RecBole (a peer's implementation, not ours) on recfm's exact leave-one-out split.

RecBole 1.2.1 needs older numpy/pandas than recfm, so it lives in its own virtualenv
(`--venv`, created on first use):

    pip install torch==2.13.0 && pip install recbole==1.2.1 "numpy<2" "pandas<3" "setuptools<81"

The domain's interactions are exported as RecBole atomic files in recfm's order (per user by time,
ties by item id; RecBole's sort by time is stable, so it sees the same order), RecBole splits
leave-one-out by time ('LS': valid_and_test, 'TO') and ranks all items with the user's history
masked ('full'), and the script checks that RecBole's test (user, item) pairs are exactly recfm's
before it reports RecBole's metrics.

    python benchmarks/sasrec_recbole.py --domain DIR [--seed 0] [--epochs 50] [--patience 10] [--work DIR]

`--patience` is RecBole's `stopping_step`: training stops after that many epochs without a better
validation NDCG@10, and the best epoch's model is tested.

With `--work`, the run keeps its state in DIR after every epoch and a rerun after a kill resumes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_PATIENCE = 10  # RecBole's stopping_step default, and what every committed SASRec run used
DEFAULT_VENV = Path(os.environ.get("RECFM_RECBOLE_VENV", Path.home() / ".cache" / "recfm" / "recbole-venv"))

RUNNER = r'''
import json, sys, os, time
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed
import torch
# importing recbole.model.sequential_recommender runs sine.py, which turns autograd's anomaly detection on
# for the whole process: a debugging mode that checks every backward result for NaN and records a
# traceback per op, 1.5x the time of every training step here; it changes no number (same loss, bit for bit)
torch.autograd.set_detect_anomaly(False)

data_path, name, seed, epochs, out, patience = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
cfg = {
    "data_path": data_path, "dataset": name, "seed": seed, "reproducibility": True, "device": "cpu", "use_gpu": False,
    "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "metrics": ["Hit", "NDCG", "MRR"], "topk": [5, 10, 20], "valid_metric": "NDCG@10",
    "epochs": epochs, "train_batch_size": 256, "eval_batch_size": 256, "stopping_step": patience,
    "loss_type": "CE", "train_neg_sample_args": None, "MAX_ITEM_LIST_LENGTH": 50,
    "n_layers": 2, "n_heads": 2, "hidden_size": 64, "inner_size": 256, "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5, "learning_rate": 0.001, "show_progress": False, "checkpoint_dir": out,
}
config = Config(model="SASRec", config_dict=cfg)
init_seed(seed, True)
dataset = create_dataset(config)
train_data, valid_data, test_data = data_preparation(config, dataset)
model = SASRec(config, train_data.dataset).to(config["device"])
trainer = Trainer(config, model)
# the run keeps its state in `out`, so a killed run resumes where it stopped: `last.pth` after every epoch
# (RecBole's checkpoint plus the RNG states of dropout and of the training loader's shuffle, so the resumed
# run is the uninterrupted one), `best.pth` for the best validation epoch, both written to a temp file and
# renamed; `fit_done` once early stopping or the epoch cap ended training
last, best, done = (os.path.join(out, f) for f in ("last.pth", "best.pth", "fit_done"))
trainer.saved_model_file = best
_save = trainer._save_checkpoint
def _atomic_best(epoch, verbose=True, **k):
    _save(epoch, verbose=verbose, saved_model_file=best + ".tmp")
    os.replace(best + ".tmp", best)
trainer._save_checkpoint = _atomic_best
valid_history, train_s = [], 0.0  # validation NDCG@10 after each epoch, to see whether the epoch budget let SASRec converge
if os.path.exists(last):
    state = torch.load(last, map_location="cpu", weights_only=False)
    trainer.resume_checkpoint(last)
    trainer.saved_model_file = best  # resume_checkpoint points it at the file it read
    torch.set_rng_state(state["rng"])
    train_data.generator.set_state(state["loader_rng"])
    valid_history, train_s = state["valid_history"], state["train_s"]
    print(f"SASRec seed {seed}: resumed after epoch {state['epoch'] + 1}", flush=True)
_valid_epoch, _train_epoch = trainer._valid_epoch, trainer._train_epoch
def _recorded(*a, **k):
    score, res = _valid_epoch(*a, **k)
    valid_history.append(float(score))
    print(f"SASRec seed {seed}: epoch {len(valid_history)}/{epochs}, validation NDCG@10 {score:.4f}", flush=True)
    return score, res
def _timed_and_kept(data, epoch_idx, **k):
    global train_s
    if epoch_idx > trainer.start_epoch:  # the previous epoch, early-stopping counters included, is complete
        # RecBole's own checkpoint (whatever keys its version writes), then the runner's state added to it
        _save(epoch_idx - 1, verbose=False, saved_model_file=last + ".tmp")
        state = torch.load(last + ".tmp", map_location="cpu", weights_only=False)
        state.update(rng=torch.get_rng_state(), loader_rng=data.generator.get_state(), valid_history=valid_history,
                     train_s=train_s)
        torch.save(state, last + ".tmp", pickle_protocol=4)
        os.replace(last + ".tmp", last)
    t0 = time.perf_counter()
    loss = _train_epoch(data, epoch_idx, **k)
    train_s += time.perf_counter() - t0
    return loss
trainer._valid_epoch, trainer._train_epoch = _recorded, _timed_and_kept
if not os.path.exists(done):
    trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    with open(done + ".tmp", "w") as f:
        json.dump({"valid_history": valid_history, "train_s": train_s}, f)
    os.replace(done + ".tmp", done)
else:
    finished = json.load(open(done))
    valid_history, train_s = finished["valid_history"], finished["train_s"]
result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
tds = test_data.dataset
uid, iid = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
users = tds.id2token(uid, tds.inter_feat[uid].numpy())
items = tds.id2token(iid, tds.inter_feat[iid].numpy())
# each test user's 0-based rank of its target, scored as trainer.evaluate scores them (the best model, the
# history and the padding item at -inf), for per-user paired tests against recfm
trainer.model.eval()
ranks = {}
with torch.no_grad():
    for batch in test_data:
        interaction, scores, pos_u, pos_i = trainer._full_sort_batch_eval(batch)
        target = scores[pos_u, pos_i]
        rank = (scores[pos_u] > target[:, None]).sum(1)
        for u, k in zip(tds.id2token(uid, interaction[uid][pos_u].cpu().numpy()), rank.tolist()):
            ranks[str(u)] = int(k)
json.dump({"metrics": {k: float(v) for k, v in result.items()},
           "test_pairs": sorted([str(u), str(i)] for u, i in zip(users, items)),
           "per_user_rank": ranks, "n_items": int(dataset.item_num - 1),
           "valid_ndcg@10_by_epoch": valid_history, "train_s": train_s,
           "torch_threads": torch.get_num_threads()}, open(os.path.join(out, "recbole.json"), "w"))
'''


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if py.exists():
        return py
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["recbole==1.2.1", "numpy<2", "pandas<3", "setuptools<81"], check=True)
    return py


def export_atomic(domain, folder: Path) -> str:
    """<name>.inter in recfm's per-user time order (RecBole's stable time sort keeps it)."""
    name = "recfm_export"
    (folder / name).mkdir(parents=True, exist_ok=True)
    with open(folder / name / f"{name}.inter", "w") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for batch in domain.interactions.select_columns(["user_id", "item_id", "timestamp"]).iter(batch_size=50_000):
            for u, i, t in zip(batch["user_id"], batch["item_id"], batch["timestamp"]):
                f.write(f"{u}\t{i}\t{t}\n")
    return name


def run_sasrec(domain_dir: str | Path, seed: int = 0, epochs: int = 50, venv: Path = DEFAULT_VENV,
               work: str | Path | None = None, patience: int = DEFAULT_PATIENCE) -> dict:
    """SASRec's test metrics and per-user NDCG on the domain's leave-one-out split. With `work`, the run
    keeps its checkpoints there and a rerun after a kill resumes from the last finished epoch."""
    import contextlib

    from recfm.data import leave_one_out, load_domain

    domain = load_domain(domain_dir)
    py = ensure_venv(venv)
    with (tempfile.TemporaryDirectory(prefix="recbole-") if work is None else contextlib.nullcontext(work)) as tmp:
        tmp = Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        name = export_atomic(domain, tmp)
        (tmp / "runner.py").write_text(RUNNER)
        env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
        subprocess.run([str(py), str(tmp / "runner.py"), str(tmp), name, str(seed), str(epochs), str(tmp), str(patience)],
                       check=True, env=env, cwd=tmp)
        out = json.loads((tmp / "recbole.json").read_text())
    ours = sorted([r["user_id"], r["target"]] for r in leave_one_out(domain).test)
    out["same_test_pairs"] = out.pop("test_pairs") == ours
    out["seed"], out["epochs"], out["patience"] = seed, epochs, patience
    if not out["same_test_pairs"]:
        raise RuntimeError("RecBole's test items differ from recfm's split: the comparison would not be fair")
    m = out["metrics"]
    out["recfm_names"] = {f"hr@{k}": m[f"hit@{k}"] for k in (5, 10, 20)} | {f"ndcg@{k}": m[f"ndcg@{k}"] for k in (5, 10, 20)}
    from recfm.eval.metrics import ndcg_per_user

    ranks = out.pop("per_user_rank")
    if sorted(ranks) != sorted(u for u, _ in ours):
        raise RuntimeError("RecBole's per-user ranks are not of recfm's test users")
    out["per_user_ndcg"] = dict(zip(ranks, ndcg_per_user(list(ranks.values())).tolist()))
    # the per-user ranks must reproduce RecBole's own NDCG@10 (ties aside: a tie counts in the target's favour here)
    out["per_user_ndcg@10_mean"] = sum(out["per_user_ndcg"].values()) / len(ranks)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--patience", type=int, default=DEFAULT_PATIENCE, help="epochs without a better validation NDCG@10 before stopping")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--work", type=Path, default=None,
                    help="folder to keep the run's checkpoints in; rerunning with it resumes a killed run")
    a = ap.parse_args()
    print(json.dumps(run_sasrec(a.domain, a.seed, a.epochs, a.venv, a.work, a.patience), indent=2))
