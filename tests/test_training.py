"""Training end to end on a tiny model: stages, resume after SIGKILL, 2-process DDP, evaluation."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from recfm.training import TrainConfig, train
from recfm.training.config import AUTO_ANSWER_DISTILL, AUTO_ID_VIEW_WEIGHT

TINY = dict(preset="tiny", batch_size=4, logging_steps=2, max_history=6, max_tokens=256, lr=3e-3, bf16=False,
            per_user=1, save_steps=4)


@pytest.fixture(scope="module")
def tok_dir(tiny_tokenizers):
    return tiny_tokenizers


@pytest.fixture(scope="module")
def tuned_run(small_default, tok_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    pre = train(TrainConfig(stage="pretrain", domain=str(small_default.path), tokenizers=str(tok_dir),
                            output=str(root / "pre"), max_steps=6, id_sequence=4, **TINY), progress=False)
    run = train(TrainConfig(stage="tune", domain=str(small_default.path), init_from=str(pre), output=str(root / "tune"),
                            max_steps=12, id_sequence=4, **TINY), progress=False)
    return run


def test_stages_write_a_loadable_run(tuned_run):
    from transformers import AutoModelForCausalLM

    import recfm.foundation  # noqa: F401  (registers the Auto classes)

    info = json.loads((tuned_run / "run.json").read_text())
    assert info["stage"] == "tune" and info["steps"] == 12
    hist = json.loads((tuned_run / "log_history.json").read_text())
    losses = [h["loss"] for h in hist if "loss" in h]
    assert len(losses) == 6 and all(l == l for l in losses)
    assert (tuned_run / "loss.png").stat().st_size > 1000
    assert any((tuned_run / "logs").iterdir())  # TensorBoard events
    assert AutoModelForCausalLM.from_pretrained(tuned_run).config.model_type == "recfm"
    ckpts = sorted(p.name for p in (tuned_run / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-12", "checkpoint-8"]  # save_total_limit 2, no staging left behind


def test_identifier_only_stage_continues_a_run(small_default, tuned_run, tmp_path):
    from recfm.data import load_domain, make_split
    from recfm.instructions import build_id_sequence_examples

    run = train(TrainConfig(stage="pretrain", domain=str(small_default.path), init_from=str(tuned_run),
                            output=str(tmp_path / "ids"), max_steps=3, id_sequence=4, pretrain_history=False,
                            group_by_length=True, **{**TINY, "logging_steps": 1}), progress=False)
    info = json.loads((run / "run.json").read_text())
    split = make_split(load_domain(small_default.path), "leave_one_out")
    assert info["examples"] == len(build_id_sequence_examples(split, 4))  # identifier rows only
    losses = [h["loss"] for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) == 3 and all(0 < l < 50 for l in losses)
    with pytest.raises(ValueError, match="pretrain_history: false"):
        TrainConfig.load(None, stage="tune", domain="x", tokenizers="y", pretrain_history=False)
    with pytest.raises(ValueError, match="pretrain_history: false"):
        TrainConfig.load(None, stage="pretrain", domain="x", tokenizers="y", pretrain_history=False, id_sequence=0)


def test_loss_goes_down_when_training_longer(small_default, tok_dir, tmp_path):
    run = train(TrainConfig(stage="tune", domain=str(small_default.path), tokenizers=str(tok_dir), output=str(tmp_path / "r"),
                            max_steps=30, tasks={"next_item": 1.0}, item_layout="id_first", **{**TINY, "logging_steps": 5}),
                progress=False)
    losses = [h["loss"] for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert json.loads((run / "config.json").read_text())["item_layout"] == "id_first"  # the layout is the model's


def test_bad_config_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: tune\ndomain: x\ntokenizers: y\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown training config field\(s\) \['learning_rate'\]"):
        TrainConfig.load(cfg)
    with pytest.raises(ValueError, match="stage must be"):
        TrainConfig.load(None, stage="fly", domain="x", tokenizers="y")
    with pytest.raises(ValueError, match="item_layout must be"):
        TrainConfig.load(None, stage="tune", domain="x", tokenizers="y", item_layout="sideways")
    with pytest.raises(ValueError, match=r"hidden_dropout must be in \[0, 1\), got 1.0"):
        TrainConfig.load(None, stage="pretrain", domain="x", tokenizers="y", hidden_dropout=1.0)


def test_validation_ranks_the_validation_split_and_keeps_the_best_weights(small_default, tuned_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from recfm.data import load_domain, make_split
    from recfm.eval.metrics import ranking_metrics, target_ranks
    from recfm.eval.runner import LoadedRun, id_view_logprobs

    class Reverse(TrainerCallback):  # after the first validation, reverse every item's score: later ones rank worse
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 3:
                model.lm_head.weight.data.neg_()

    run = train(TrainConfig(stage="tune", domain=str(small_default.path), init_from=str(tuned_run), output=str(tmp_path / "v"),
                            max_steps=6, id_sequence=4, validation="steps", validation_steps=2, validation_users=30,
                            keep_best=True, **{**TINY, "save_total_limit": 1}), progress=False, callbacks=[Reverse()])
    info = json.loads((run / "run.json").read_text())
    points = info["validation"]
    assert [p["step"] for p in points] == [2, 4, 6] and all(p["users"] == 30 for p in points)
    assert all(0 <= p["ndcg@10"] <= p["hr@10"] <= 1 for p in points)
    assert points[0]["ndcg@10"] > max(p["ndcg@10"] for p in points[1:])
    assert info["weights_from_step"] == 2
    # the run ends with the best validation's weights, whose checkpoint outlived the rotation of save_total_limit 1
    # at steps 4 and 6 (transformers then drops the rest at the end)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(run / "checkpoints" / "checkpoint-2")  # where a resumed run finds it
    kept = load_file(run / "checkpoints" / "checkpoint-2" / "model.safetensors")
    final = load_file(run / "model.safetensors")
    assert all(torch.equal(final[k], kept[k]) for k in kept)
    assert (run / "loss.png").stat().st_size > 1000
    # the number is recfm eval's identifier view (full ranking, training items masked) of those weights, on the
    # seeded sample of 30 validation users
    domain = load_domain(small_default.path)
    valid = list(make_split(domain, "leave_one_out").valid)
    rows = sorted(random.Random(0).sample(valid, 30), key=lambda r: r["user_id"])
    loaded = LoadedRun(run, domain)
    view = id_view_logprobs(loaded, rows, {r["user_id"]: list(r["history"]) for r in rows}, 4, progress=False)
    ranks = target_ranks(torch.stack([view[r["user_id"]] for r in rows]).numpy(),
                         [loaded.tok.items.index(r["target"]) for r in rows])
    assert ranking_metrics(ranks.tolist())["ndcg@10"] == pytest.approx(points[0]["ndcg@10"], abs=1e-6)
    with pytest.raises(ValueError, match="keep_best keeps the weights of the best validation"):
        TrainConfig.load(None, stage="tune", domain="x", tokenizers="y", keep_best=True)
    with pytest.raises(ValueError, match="validation: steps needs validation_steps"):
        TrainConfig.load(None, stage="tune", domain="x", tokenizers="y", validation="steps")
    with pytest.raises(ValueError, match="split 'cold_items' has none"):
        TrainConfig.load(None, stage="tune", domain="x", tokenizers="y", validation="epoch", split="cold_items",
                         item_mode="content")


def _cli(args, **kw):
    return [sys.executable, "-m", "recfm.cli", *map(str, args)]


def _tune_cmd(domain, tok, out, steps):
    return _cli(["tune", "--domain", domain, "--tokenizers", tok, "--output", out, "--max-steps", steps,
                 "--preset", "tiny", "--set", "batch_size=4", "--set", "logging_steps=1", "--set", "save_steps=3",
                 "--set", "bf16=false", "--set", "max_history=6", "--set", "per_user=1", "--set", "lr=3e-3",
                 "--set", "save_total_limit=5"])


def test_sigkill_then_resume_continues_the_same_loss_curve(small_default, tok_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_tune_cmd(small_default.path, tok_dir, tmp_path / "ref", 9), env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ref_losses = {h["step"]: h["loss"] for h in json.loads((tmp_path / "ref" / "log_history.json").read_text()) if "loss" in h}

    out = tmp_path / "killed"
    proc = subprocess.Popen(_tune_cmd(small_default.path, tok_dir, out, 9), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "checkpoint-3").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "run.json").exists()  # it really died mid-run
    resumed = subprocess.run(_tune_cmd(small_default.path, tok_dir, out, 9), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    hist = json.loads((out / "log_history.json").read_text())
    losses = {h["step"]: h["loss"] for h in hist if "loss" in h}
    assert max(losses) == 9
    first_resumed = min(s for s in losses if s > 3)
    for step in range(first_resumed, 10):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-3, abs=1e-3), (step, losses, ref_losses)


SYNC_SCRIPT = r'''
import hashlib, json, os, sys
import torch
from transformers import TrainerCallback
from recfm.training import TrainConfig, train

class Checksum(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kw):
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            h.update(p.detach().float().numpy().tobytes())
        rank = int(os.environ.get("RANK", 0))
        open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w").write(json.dumps(
            {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", 1)), "sha": h.hexdigest(), "step": state.global_step}))

cfg = TrainConfig(stage="tune", domain=sys.argv[1], tokenizers=sys.argv[2], output=os.path.join(sys.argv[3], "run"),
                  preset="tiny", batch_size=2, max_steps=4, bf16=False, max_history=6, per_user=1, save_steps=100,
                  logging_steps=1, tasks={"next_item": 1.0})
train(cfg, progress=False, callbacks=[Checksum()])
'''


def test_two_process_ddp_keeps_parameters_in_sync(small_default, tok_dir, tmp_path):
    script = tmp_path / "sync.py"
    script.write_text(SYNC_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import socket

    with socket.socket() as sock:  # a free port: a fixed one collides with another run on the machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port),
                           str(script), str(small_default.path), str(tok_dir), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    # the first failing rank's own error, not only the peers' "connection closed" that follows it
    first = [line for line in proc.stderr.splitlines() if "Error" in line or "[rank" in line][:40]
    assert proc.returncode == 0, "\n".join(first) + "\n...\n" + proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["step"] == 4 for r in ranks)
    assert ranks[0]["sha"] == ranks[1]["sha"]
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_eval_reports_every_task_with_baselines(tuned_run, small_default, tmp_path):
    from recfm.eval.runner import evaluate, save_report

    report = evaluate(tuned_run, small_default.path, max_users=12, progress=False)
    assert set(report["tasks"]) == {"next_item", "pick_candidate", "explanation", "yes_no", "which_image", "rating",
                                    "review", "image_generation", "next_item_fused"}
    for task, by in report["tasks"].items():
        if task == "next_item_fused":  # the prompts fused with the identifier view at the run's own weight
            assert list(by) == [f"{AUTO_ID_VIEW_WEIGHT:g}"] and set(by[f"{AUTO_ID_VIEW_WEIGHT:g}"]) == {"seen", "held_out"}
            continue
        assert set(by) == ({"seen", "held_out", "id_sequence"} if task == "next_item" else {"seen", "held_out"}), task
    nxt = report["tasks"]["next_item"]["seen"]
    assert 0.0 <= nxt["hr@5"] <= nxt["hr@10"] <= nxt["hr@20"] <= 1.0
    ranks = [e["rank"] for e in report["per_example"]["next_item"] if not e["held_out"]]
    assert len(ranks) == 12 and all(0 <= r < 80 for r in ranks)
    b = report["baselines"]
    assert b["oracle"]["ndcg@10"] >= b["text_only_oracle"]["ndcg@10"] - 0.05
    assert 0.0 <= b["yes_no_popularity"]["auc"] <= 1.0
    for task in ("explanation", "review"):  # both retrieval baselines, on the task's own requests
        assert set(b[f"{task}_retrieval"]) == set(b[f"{task}_item_latest"]) == {"bleu4", "rouge1", "rouge2", "rougeL"}
    out = save_report(report, tmp_path / "ev")
    assert (out / "eval.png").stat().st_size > 1000 and json.loads((out / "eval.json").read_text())["users"] == 12


def test_eval_fuses_the_prompts_with_the_identifier_view(tuned_run, small_default):
    """The fused next-item ranking is each prompt's log-probabilities plus the weight times the identifier
    view's over the same user's history (computed here by hand from the two views' scores); without a weight
    asked for, the run's own (tuning saves it with the view's length)."""
    from recfm.data import leave_one_out
    from recfm.eval.runner import LoadedRun, evaluate, ranking_scores
    from recfm.instructions import build_eval_examples

    saved = json.loads((tuned_run / "config.json").read_text())
    assert saved["id_view_length"] == 4 and saved["id_view_weight"] == AUTO_ID_VIEW_WEIGHT > 0
    report = evaluate(tuned_run, small_default.path, tasks=["next_item"], max_users=6, progress=False,
                      id_view_weight=[0.0, 0.5, 3.0])
    assert set(report["tasks"]["next_item_fused"]) == {"0.5", "3"}
    assert set(report["tasks"]["next_item_fused"]["0.5"]) == {"seen", "held_out"}

    split = leave_one_out(small_default)
    rows = list(build_eval_examples(small_default, split, tasks=["next_item"], max_users=6))
    first = {}
    for r in rows:
        first.setdefault(r["held_out"], r["template_id"])
    rows = [r for r in rows if first[r["held_out"]] == r["template_id"]]
    masked = {e["user_id"]: list(e["history"]) for e in split.test.select(range(6))}
    run = LoadedRun(tuned_run, small_default)
    prompt = {(r["user_id"], r["held_out"]): (s, t) for chunk, scores, targets in ranking_scores(run, rows, masked, progress=False)
              for r, s, t in zip(chunk, scores, targets)}
    view = {r["user_id"]: s.log_softmax(-1) for chunk, scores, _ in ranking_scores(run, rows, masked, progress=False,
                                                                                     id_sequence=4)
            for r, s in zip(chunk, scores)}
    for w in (0.5, 3.0):
        got = {(e["user_id"], e["held_out"]): e["rank"] for e in report["per_example"]["next_item_fused"][f"{w:g}"]}
        assert set(got) == set(prompt) and len(got) == 12
        for key, (s, t) in prompt.items():
            fused = s.log_softmax(-1) + w * view[key[0]]
            assert got[key] == int((fused > fused[t]).sum()), (w, key)
    alone = {(e["user_id"], e["held_out"]): e["rank"] for e in report["per_example"]["next_item"]}
    assert alone == {k: int((s > s[t]).sum()) for k, (s, t) in prompt.items()}
    view_ranks = {e["user_id"]: e["rank"] for e in report["per_example"]["next_item_id_sequence"]}
    assert view_ranks == {u: int((view[u] > view[u][t]).sum()) for (u, _), (_, t) in prompt.items()}
    default = evaluate(tuned_run, small_default.path, tasks=["next_item"], max_users=3, progress=False)
    assert set(default["tasks"]["next_item_fused"]) == {f"{AUTO_ID_VIEW_WEIGHT:g}"}
    assert "next_item_fused" not in evaluate(tuned_run, small_default.path, tasks=["next_item"], max_users=3,
                                             progress=False, id_view_weight=0)["tasks"]
    with pytest.raises(ValueError, match="id_view_weight"):
        evaluate(tuned_run, small_default.path, tasks=["next_item"], max_users=3, progress=False, id_view_weight=-1)
    unset = TrainConfig.load(None, stage="tune", domain="x", tokenizers="y")
    assert unset.view_weight("content", 50) == AUTO_ID_VIEW_WEIGHT
    assert unset.view_weight("semantic", 50) == 0 and unset.view_weight("atomic", 0) == 0
    with pytest.raises(ValueError, match="id_view_weight"):
        TrainConfig.load(None, stage="tune", domain="x", tokenizers="y", id_view_weight=2.0).view_weight("atomic", 0)
    with pytest.raises(ValueError, match="id_view_weight"):
        TrainConfig.load(None, stage="tune", domain="x", tokenizers="y", id_view_weight=-1.0)


def test_tuning_replays_the_identifier_sequences_with_the_context_loss(tuned_run, small_default):
    from recfm.data import leave_one_out
    from recfm.training.trainer import _examples

    cfg = TrainConfig(stage="tune", domain=str(small_default.path), init_from=str(tuned_run), output="unused",
                      id_sequence=4, tasks={"next_item": 1.0, "id_sequence": 1.0}, **TINY)
    ex = _examples(cfg, small_default, leave_one_out(small_default))
    seqs = ex.filter(lambda r: r["task"] == "id_sequence")
    assert 0 < len(seqs) < len(ex) and set(seqs["template_id"]) == {"id_sequence"}
    off = _examples(TrainConfig(**{**cfg.__dict__, "id_sequence": 0}), small_default, leave_one_out(small_default))
    assert "id_sequence" not in set(off["task"])
    assert json.loads((tuned_run / "config.json").read_text())["context_loss_weight"] == 1.0


def test_ranking_masks_the_whole_history_in_both_views(tuned_run, small_default):
    """Every item of the user's history is masked, not only those the prompt shows: masking all but the
    target leaves it first, in the templated prompt and in the identifier-sequence view."""
    from recfm.data import leave_one_out
    from recfm.eval.runner import LoadedRun, eval_ranking
    from recfm.instructions import build_eval_examples

    split = leave_one_out(small_default)
    rows = list(build_eval_examples(small_default, split, tasks=["next_item"], max_users=6, max_history=2))
    run = LoadedRun(tuned_run, small_default)
    everything_else = {r["user_id"]: [i for i in small_default.item_ids if i != r["target"]] for r in rows}
    for view in (0, 4):
        assert eval_ranking(run, rows, everything_else, progress=False, id_sequence=view) == [0] * len(rows)
    history = {e["user_id"]: list(e["history"]) for e in split.test}
    ranks = eval_ranking(run, rows, history, progress=False)
    assert all(k < len(small_default.item_ids) - len(set(history[r["user_id"]])) for r, k in zip(rows, ranks))


def test_semantic_ids_rank_every_item_in_both_views(small_default, tok_dir, tmp_path):
    """Semantic ids are ranked over the whole catalogue (each item's code-sequence log-probability), with
    the history masked, in the templated prompt and in the identifier-sequence view; eval reports both."""
    from recfm.data import leave_one_out
    from recfm.eval.runner import LoadedRun, eval_ranking, evaluate
    from recfm.instructions import build_eval_examples

    pre = train(TrainConfig(stage="pretrain", domain=str(small_default.path), tokenizers=str(tok_dir),
                            output=str(tmp_path / "pre"), max_steps=1, item_mode="semantic", **TINY), progress=False)
    split = leave_one_out(small_default)
    rows = list(build_eval_examples(small_default, split, tasks=["next_item"], max_users=5, max_history=2))
    run = LoadedRun(pre, small_default)
    everything_else = {r["user_id"]: [i for i in small_default.item_ids if i != r["target"]] for r in rows}
    nothing = {r["user_id"]: [] for r in rows}
    for view in (0, 4):
        assert eval_ranking(run, rows, everything_else, progress=False, id_sequence=view) == [0] * len(rows)
        ranks = eval_ranking(run, rows, nothing, progress=False, id_sequence=view)
        assert all(0 <= k < len(small_default.item_ids) for k in ranks)
    report = evaluate(pre, small_default.path, tasks=["next_item", "pick_candidate"], max_users=5, progress=False)
    assert {"seen", "id_sequence"} <= set(report["tasks"]["next_item"])
    assert 0 <= report["tasks"]["pick_candidate"]["seen"]["accuracy"] <= 1


def test_content_items_without_residuals_are_their_content_alone(small_default, tok_dir, tmp_path):
    """item_id_residual: false builds a content-id model with no per-item vectors: two items with the
    same content get the same vector, whatever training did."""
    from recfm.foundation import RecFMForCausalLM

    run = train(TrainConfig(stage="pretrain", domain=str(small_default.path), tokenizers=str(tok_dir), output=str(tmp_path / "r"),
                            max_steps=1, item_mode="content", item_id_residual=False, item_text="tokens", **TINY), progress=False)
    model = RecFMForCausalLM.from_pretrained(run).eval()
    enc = model.model.item_encoder
    assert model.config.item_id_residual is False and enc.id_residual is None
    x = torch.randn(1, enc.text.in_features).expand(2, -1)
    with torch.no_grad():
        out = enc(x, x, torch.tensor([True, True]), torch.tensor([0, 5]))
    assert torch.equal(out[0], out[1])


def test_words_mode_reads_the_words_training_items_share(small_default, tok_dir, tmp_path):
    """item_text: words: the vocabulary comes from the items seen in training (on the cold split a word
    only new items have is not in it), every item's words are in the saved model, and an item's vector
    is its words (and image): two items with the same words and image get the same vector."""
    from recfm.data import cold_item_split
    from recfm.foundation import RecFMForCausalLM
    from recfm.tokenizers.bundle import Tokenizers
    from recfm.tokenizers.words import WordVocabulary, item_words
    from recfm.training.collate import item_description

    run = train(TrainConfig(stage="pretrain", domain=str(small_default.path), tokenizers=str(tok_dir), output=str(tmp_path / "r"),
                            max_steps=1, item_mode="content", item_id_residual=False, item_text="words", item_word_min_df=2, item_image=True,
                            split="cold_items", cold_fraction=0.1, cold_seed=3, **TINY), progress=False)
    model = RecFMForCausalLM.from_pretrained(run).eval()
    index = Tokenizers(run).index
    texts = {r["item_id"]: item_description(r["title"], r["text"]) for r in small_default.items}
    warm = [texts[i] for i in index.item_ids[: index.n_train_items]]
    vocab = WordVocabulary.from_texts(warm, 2)
    assert model.config.item_text == "words" and tuple(model.config.item_word_vocab) == vocab.words
    cold = cold_item_split(small_default, 0.1, 3).cold_items
    warm_words = [w for t in warm for w in item_words(t)]
    assert not {w for i in cold for w in item_words(texts[i])} - set(warm_words) & set(vocab.words)
    m = model.model
    for k in (0, index.n_train_items, len(index) - 1):  # a warm item and new ones: their words as saved
        ids, weights = vocab.encode(texts[index.item_ids[k]], model.config.item_text_len)
        assert m.catalogue_word_ids[k, : len(ids)].tolist() == ids and int((m.catalogue_word_ids[k] >= 0).sum()) == len(ids)
        assert m.catalogue_word_weights[k, : len(ids)].tolist() == pytest.approx(weights)
    enc = m.item_encoder
    assert enc.words.num_embeddings == len(vocab)
    img = torch.randn(1, enc.image.in_features).expand(3, -1)
    words = torch.tensor([[0, 1, -1], [0, 1, -1], [0, 2, -1]])
    weights = torch.tensor([[0.6, 0.8, 0.5]]).expand(3, -1)
    with torch.no_grad():
        out = enc(None, img, torch.tensor([True] * 3), torch.tensor([0, 5, 7]), word_ids=words, word_weights=weights)
    assert torch.equal(out[0], out[1]) and not torch.allclose(out[0], out[2])
    with pytest.raises(ValueError, match="item_text"):
        TrainConfig(stage="pretrain", domain=str(small_default.path), tokenizers=str(tok_dir), item_text="letters").validate()


def test_cold_item_split_trains_without_the_cold_items_and_ranks_them(small_default, tok_dir, tmp_path):
    """split cold_items: training never sees the cold items (not in examples, vocabulary order last),
    the run records its draw, evaluation asks for cold items only and refuses a run that saw them."""
    from recfm.data import cold_item_split
    from recfm.eval.runner import evaluate
    from recfm.tokenizers.bundle import Tokenizers

    cold = dict(split="cold_items", cold_fraction=0.1, cold_seed=3)
    pre = train(TrainConfig(stage="pretrain", domain=str(small_default.path), tokenizers=str(tok_dir), output=str(tmp_path / "pre"),
                            max_steps=2, item_mode="content", item_text="tokens", item_id_residual=True, item_image=True, **cold,
                            **TINY), progress=False)
    info = json.loads((pre / "run.json").read_text())["split"]
    split = cold_item_split(small_default, 0.1, 3)
    assert info["name"] == "cold_items" and info["cold_items"] == list(split.cold_items)
    index = Tokenizers(pre).index
    assert set(index.item_ids[index.n_train_items:]) >= set(split.cold_items)  # never-seen items come last
    # no loss ever reached a cold item's residual (not even as a negative), so it is scored from its content alone
    from recfm.foundation import RecFMForCausalLM

    model = RecFMForCausalLM.from_pretrained(pre).eval()
    enc = model.model.item_encoder
    cold_rows = torch.tensor([index.item_ids.index(i) for i in split.cold_items])
    assert bool((enc.id_residual.weight[cold_rows] == 0).all()) and bool(enc.id_residual.weight[:index.n_train_items].any())
    w0 = int(enc.id_residual.weight[: index.n_train_items].any(1).nonzero()[0])  # a trained row
    x = torch.zeros(2, enc.text.in_features)
    with torch.no_grad():
        out = enc(x, x, torch.tensor([True, True]), torch.stack([cold_rows[0], torch.tensor(w0)]))
    assert torch.allclose(out[1] - out[0], enc.id_residual.weight[w0], atol=1e-6)
    with pytest.raises(ValueError, match="other cold items"):
        train(TrainConfig(stage="tune", domain=str(small_default.path), init_from=str(pre), output=str(tmp_path / "x"),
                          max_steps=1, split="cold_items", cold_fraction=0.2, cold_seed=3, **TINY), progress=False)
    with pytest.raises(ValueError, match="content or semantic"):
        TrainConfig(stage="pretrain", domain=str(small_default.path), tokenizers=str(tok_dir), **cold).validate()

    report = evaluate(pre, small_default.path, split="cold_items", progress=False)
    assert report["split"] == "cold_items" and report["users"] == len(split.test) > 0
    # full ranking, and among the new items; each also fused with the identifier view at the run's weight
    assert set(report["tasks"]) == {"next_item", "next_item_among_new", "next_item_fused", "next_item_among_new_fused"}
    assert set(report["tasks"]["next_item_among_new_fused"]["1"]) == {"seen", "held_out"}
    assert {"random", "popularity", "content_profile"} <= set(report["baselines"])
    assert report["baselines"]["random"]["hr@10"] == pytest.approx(10 / 80, rel=0.2)
    n_new = report["cold_items"]
    assert n_new == len(split.cold_items)
    assert report["baselines_among_new"]["random"]["median_rank"] == (n_new + 1) / 2
    # a target's place among the new items, recounted from the model's own scores: how many new items
    # (in the run's vocabulary order, not the catalogue's) score above it, the user's history masked
    from recfm.eval.runner import LoadedRun, score_catalogue
    from recfm.instructions.examples import build_eval_examples

    run = LoadedRun(pre, small_default)
    items = run.tok.items
    new_idx = [items.index(i) for i in split.cold_items]
    history = {e["user_id"]: list(e["history"]) for e in split.test}
    seen_rows = [r for r in build_eval_examples(small_default, split, stage="test", tasks=["next_item"], seed=0)
                 if not r["held_out"]]
    seen_rows = [r for r in seen_rows if r["template_id"] == seen_rows[0]["template_id"]][:5]
    reported = {e["user_id"]: e["rank"] for e in report["per_example"]["next_item_among_new"] if not e["held_out"]}
    for r in seen_rows:
        scores = score_catalogue(run, [run.prompt(r["messages"])], [[items.index(i) for i in history[r["user_id"]]]])[0]
        target = scores[items.index(r["target"])]
        assert reported[r["user_id"]] == sum(int(scores[k] > target) for k in new_idx)
    with pytest.raises(ValueError, match="cold items were in its training data"):
        evaluate(tmp_path / "missing-run-json", small_default.path, split="cold_items")


SHOP_WORDS = ("zesty", "quirky", "plucky", "snazzy")  # words no default-domain item has


def _shop(tmp_path):
    """A shop with 12 new items (ids unlike the old catalogue's; each blurb one of four words, so three
    items share each), images, and 10 users, through the generic importer."""
    from recfm.data.generic import Columns, prepare_generic
    from recfm.data.synthetic import draw_random_images

    src = tmp_path / "shop"
    (src / "images").mkdir(parents=True)
    for k, im in enumerate(draw_random_images(12, 32, seed=9)):
        im.save(src / "images" / f"p{k}.png")
    (src / "items.csv").write_text("sku,name,blurb,pic\n" + "".join(
        f"sku{k},Gizmo {k},A {SHOP_WORDS[k % 4]} gizmo,p{k}.png\n" for k in range(12)))
    rows = ["uid,sku,when"] + [f"u{u},sku{(u + t) % 12},{100 * u + t}" for u in range(10) for t in range(6)]
    (src / "interactions.csv").write_text("\n".join(rows) + "\n")
    return prepare_generic(tmp_path / "shop-domain", input_dir=src, columns=Columns(user="uid", item="sku", timestamp="when",
                           item_id="sku", title="name", text="blurb", image="pic"), progress=False)


def test_lora_finetune_on_a_new_domain_through_the_generic_importer(small_default, tok_dir, tmp_path):
    import torch
    from safetensors import safe_open

    from recfm.foundation import RecFMForCausalLM
    from recfm.tokenizers.bundle import Tokenizers

    base = train(TrainConfig(stage="tune", domain=str(small_default.path), tokenizers=str(tok_dir), item_mode="content",
                             item_text="tokens", item_id_residual=True, item_image=True,
                             output=str(tmp_path / "base"), max_steps=4, tasks={"next_item": 1.0}, **TINY), progress=False)
    shop = _shop(tmp_path)
    run = train(TrainConfig(stage="finetune", domain=str(shop.path), init_from=str(base), output=str(tmp_path / "ft"),
                            max_steps=4, tasks={"next_item": 1.0}, **TINY), progress=False)
    info = json.loads((run / "run.json").read_text())
    assert info["stage"] == "finetune" and info["steps"] == 4
    model = RecFMForCausalLM.from_pretrained(run)
    assert model.config.n_items == 12
    with safe_open(run / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k]  # adapters merged into the saved weights
    tok = Tokenizers(run)
    assert sorted(tok.items.item_ids) == sorted(f"sku{k}" for k in range(12))
    # the fine-tuned model ranks the new catalogue
    from recfm.instructions.chat import render
    from recfm.training.collate import Collator, ItemImages, render_context

    collator = Collator(render_context(tok, shop, model.config), ItemImages(shop, 32), model.config)
    msgs = [{"role": "user", "content": [{"type": "item", "item_id": "sku1", "view": "history"},
                                         {"type": "text", "text": " next?"}]}]
    b = collator.batch([render(msgs, collator.ctx, add_generation_prompt=True)])
    scores = model.score_items(b["input_ids"], b["attention_mask"], b.get("pixel_values"), b.get("content_item_ids"),
                               exclude=[[tok.items.index("sku1")]])
    assert scores.shape == (1, 12) and torch.isinf(scores[0, tok.items.index("sku1")])
    assert torch.isfinite(scores).sum() == 11


def test_finetuning_a_words_model_grows_its_vocabulary_with_the_new_domains_words(small_default, tok_dir, tmp_path):
    """item_text words, fine-tuned on a new domain: the vocabulary keeps the old words at their ids and
    adds the words the new domain's training items share; the item encoder trains (LoRA or not), so the
    new words' vectors, which start at zero, are learned; items are read from their new words."""
    from safetensors import safe_open

    from recfm.foundation import RecFMForCausalLM
    from recfm.tokenizers.bundle import Tokenizers
    from recfm.tokenizers.words import WordVocabulary
    from recfm.training.collate import item_description

    words = dict(item_mode="content", item_text="words", item_id_residual=False, item_image=False, item_word_min_df=2)
    base = train(TrainConfig(stage="tune", domain=str(small_default.path), tokenizers=str(tok_dir), output=str(tmp_path / "base"),
                             max_steps=2, tasks={"next_item": 1.0}, **words, **TINY), progress=False)
    old = RecFMForCausalLM.from_pretrained(base)
    old_words = list(old.config.item_word_vocab)
    assert not set(SHOP_WORDS) & set(old_words)
    shop = _shop(tmp_path)
    run = train(TrainConfig(stage="finetune", domain=str(shop.path), init_from=str(base), output=str(tmp_path / "ft"),
                            max_steps=6, tasks={"next_item": 1.0}, item_word_min_df=2,
                            **{**TINY, "lr": 3e-2}), progress=False)
    with safe_open(run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors", "pt") as f:  # resumable
        assert any("item_encoder" in k and "words" in k for k in f.keys())
    model = RecFMForCausalLM.from_pretrained(run).eval()
    grown = list(model.config.item_word_vocab)
    index = Tokenizers(run).index
    texts = {r["item_id"]: item_description(r["title"], r["text"]) for r in shop.items}
    want = WordVocabulary(tuple(old_words), tuple(old.config.item_word_idf)).extend(
        WordVocabulary.from_texts([texts[i] for i in index.item_ids[: index.n_train_items]], 2))
    assert tuple(grown) == want.words and model.config.item_word_idf == pytest.approx(want.idf)
    assert grown[: len(old_words)] == old_words and set(SHOP_WORDS) <= set(grown[len(old_words):])
    m = model.model
    for k, iid in enumerate(index.item_ids):  # every item's words, as saved, are its text in the grown vocabulary
        ids, _ = want.encode(texts[iid], model.config.item_text_len)
        assert m.catalogue_word_ids[k, : len(ids)].tolist() == ids
    table = m.item_encoder.words.weight
    assert table.shape[0] == len(grown)
    assert all(bool(table[grown.index(w)].any()) for w in SHOP_WORDS)  # started at zero, trained
    with torch.no_grad():
        vec = m.item_embeddings()
    pos = {iid: k for k, iid in enumerate(index.item_ids)}
    assert torch.allclose(vec[pos["sku0"]], vec[pos["sku4"]], atol=1e-5)  # same words ("zesty"), no image, no residual
    assert not torch.allclose(vec[pos["sku0"]], vec[pos["sku1"]], atol=1e-3)  # zesty vs quirky
    kept = train(TrainConfig(stage="finetune", domain=str(shop.path), init_from=str(base), output=str(tmp_path / "kept"),
                             max_steps=1, tasks={"next_item": 1.0}, item_word_grow=False, **TINY), progress=False)
    assert RecFMForCausalLM.from_pretrained(kept).config.item_word_vocab == old_words  # read with the old words only


def test_qlora_trains_adapters_over_a_4bit_base_and_merges_them_into_the_original_weights(tuned_run, small_default, tmp_path):
    """qlora: while training, every linear layer of the language model is a frozen NF4 bitsandbytes layer
    and only adapters (and the head) learn; the saved model is the original weights plus each adapter's
    low-rank delta, and a layer without an adapter comes back bit for bit (not a dequantized copy)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import LoraLayer
    from transformers import TrainerCallback

    from recfm.foundation import RecFMForCausalLM

    seen = {}

    class Inspect(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            lm = model.get_base_model().model.language_model
            q, down = lm.layers[0].self_attn.q_proj, lm.layers[0].mlp.down_proj
            seen["q"] = isinstance(q, LoraLayer) and isinstance(q.base_layer, bnb.nn.Linear4bit)
            seen["down"] = isinstance(down, bnb.nn.Linear4bit)
            seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad and "language_model" in n}

    run = train(TrainConfig(stage="finetune", domain=str(small_default.path), init_from=str(tuned_run), output=str(tmp_path / "q"),
                            max_steps=3, qlora=True, tasks={"next_item": 1.0}, **{**TINY, "lr": 3e-2}),
                progress=False, callbacks=[Inspect()])
    assert seen["q"] and seen["down"]
    assert seen["trainable"] and all("lora_" in n for n in seen["trainable"])
    before = RecFMForCausalLM.from_pretrained(tuned_run).model.language_model
    after = RecFMForCausalLM.from_pretrained(run).model.language_model
    for a, b in zip(before.layers, after.layers):
        assert torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight)  # no adapter: the original, bit for bit
        delta = b.self_attn.q_proj.weight - a.self_attn.q_proj.weight
        assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta) <= TrainConfig.lora_r  # the adapter's delta only
    with pytest.raises(ValueError, match="qlora"):
        TrainConfig(stage="tune", domain=str(small_default.path), init_from=str(tuned_run), qlora=True).validate()


def test_finetuning_atomic_ids_on_a_new_domain_is_a_clear_error(tuned_run, tmp_path):
    from recfm.data.generic import prepare_generic

    src = tmp_path / "s"
    src.mkdir()
    (src / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,a,1\nu1,b,2\nu1,c,3\n")
    shop = prepare_generic(tmp_path / "d", input_dir=src, progress=False)
    with pytest.raises(ValueError, match="cannot name a new domain's items"):
        train(TrainConfig(stage="finetune", domain=str(shop.path), init_from=str(tuned_run), output=str(tmp_path / "x"),
                          max_steps=2, **TINY), progress=False)


@pytest.mark.parametrize("mode", ["atomic", "content"])
def test_answer_distillation_is_the_kl_from_the_identifier_view_to_the_prompts_answer(mode, tuned_run, small_default,
                                                                                   tok_dir, tmp_path):
    """answer_distill: each next-item row's teacher is its training prefix (never its target) in the
    identifier-only view; the loss adds weight x KL(id view || prompt) over the catalogue, where the
    prompt's distribution is what `score_items` ranks at evaluation and the id view's what its id view ranks."""
    import torch.nn.functional as F

    from recfm.data import load_domain, make_split
    from recfm.foundation import RecFMForCausalLM
    from recfm.instructions.chat import id_sequence_prompt, render
    from recfm.tokenizers.bundle import Tokenizers
    from recfm.training.collate import Collator, ItemImages, content_catalogue, render_context
    from recfm.training.trainer import _examples

    run = tuned_run if mode == "atomic" else train(TrainConfig(
        stage="pretrain", domain=str(small_default.path), tokenizers=str(tok_dir), output=str(tmp_path / "c"),
        max_steps=2, id_sequence=4, item_mode="content", **TINY), progress=False)
    cfg = TrainConfig(stage="tune", domain=str(small_default.path), init_from=str(run), output=str(tmp_path / "t"),
                      id_sequence=4, answer_distill=0.5, tasks={"next_item": 1.0, "yes_no": 1.0}, **TINY)
    split = make_split(load_domain(small_default.path), "leave_one_out")
    rows = list(_examples(cfg, small_default, split).select(range(8)))
    assert {"next_item", "yes_no"} == {r["task"] for r in rows}
    train_seq = {s["user_id"]: s["item_ids"] for s in split.train}
    for r in rows:  # the teacher's history is the prefix before the row's target inside the training sequence
        hist = r["history"]
        assert train_seq[r["user_id"]][: len(hist) + 1] == hist + [r["target"]]

    model = RecFMForCausalLM.from_pretrained(run).eval()
    tok = Tokenizers(run)
    images = ItemImages(small_default, model.config.vision_config.image_size)
    if mode == "content":
        content_catalogue(model, tok, small_default, images)
    ctx = render_context(tok, small_default, model.config, 256)
    batch = Collator(ctx, images, model.config, distill=4)(rows)
    picked = [k for k, r in enumerate(rows) if r["task"] == "next_item"]
    assert batch["teacher_rows"].tolist() == picked
    first = id_sequence_prompt(rows[picked[0]]["history"][-4:], ctx).input_ids
    assert batch["teacher_input_ids"][0, : len(first)].tolist() == first

    with torch.no_grad():
        model.config.answer_distill = 0.5
        with_kl = model(**batch).loss
        plain = model(**{k: v for k, v in batch.items() if not k.startswith("teacher_")}).loss
        # by hand, through the ranking path evaluation uses: the prompt open at its answer, and the id view
        prompts = Collator(ctx, images, model.config).batch(
            [render(json.loads(rows[k]["messages"])[:1], ctx, add_generation_prompt=True) for k in picked])
        student = model.score_items(prompts["input_ids"], prompts["attention_mask"], prompts.get("pixel_values"),
                                    prompts.get("content_item_ids"))
        teacher = model.score_items(batch["teacher_input_ids"], batch["teacher_attention_mask"],
                                    content_item_ids=batch.get("teacher_content_item_ids"))
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    assert float(kl) > 1e-4
    assert float(with_kl - plain) == pytest.approx(0.5 * float(kl), rel=1e-3, abs=1e-5)

    if mode == "atomic":  # a real tuning run with the term, and the settings it cannot take
        done = train(TrainConfig(**{**cfg.__dict__, "max_steps": 2}), progress=False)
        assert json.loads((done / "config.json").read_text())["answer_distill"] == 0.5
        losses = [h["loss"] for h in json.loads((done / "log_history.json").read_text()) if "loss" in h]
        assert losses and all(0 < x < 50 for x in losses)
        assert json.loads((tuned_run / "config.json").read_text())["answer_distill"] == AUTO_ANSWER_DISTILL > 0  # unset
        unset = TrainConfig.load(None, stage="tune", domain="x", tokenizers="y")
        assert unset.distill_weight("content") == AUTO_ANSWER_DISTILL and unset.distill_weight("semantic") == 0
        assert TrainConfig.load(None, stage="pretrain", domain="x", tokenizers="y").distill_weight("atomic") == 0
        assert TrainConfig.load(None, stage="tune", domain="x", tokenizers="y", id_sequence=0).distill_weight("atomic") == 0
        with pytest.raises(ValueError, match="answer_distill"):
            TrainConfig.load(None, stage="pretrain", domain="x", tokenizers="y", answer_distill=1.0)
        with pytest.raises(ValueError, match="answer_distill"):
            TrainConfig.load(None, stage="tune", domain="x", tokenizers="y", answer_distill=1.0, id_sequence=0)


def test_rows_are_measured_for_batching_by_length(small_default, tok_dir):
    """The trainer measures every row in tokens (the `length` column LengthGroupedSampler batches by),
    leaves out and counts rows that cannot fit, and short identifier rows then share batches."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from recfm.data import make_split
    from recfm.foundation.build import build_model
    from recfm.instructions import build_pretraining_examples
    from recfm.tokenizers.bundle import Tokenizers
    from recfm.training.collate import Collator, ItemImages, render_context
    from recfm.training.trainer import _measure

    tok = Tokenizers(tok_dir)
    model = build_model("tiny", tok)
    split = make_split(small_default, "leave_one_out")
    rows = build_pretraining_examples(split, max_history=6, id_sequence=4)
    collator = Collator(render_context(tok, small_default, model.config, 256), ItemImages(small_default, 32), model.config)
    measured, dropped = _measure(rows, collator)
    assert dropped == 0 and len(measured) == len(rows)
    assert measured["length"] == [len(collator.encode(m).input_ids) for m in rows["messages"]]
    short = [t == "id_sequence" for t in measured["template_id"]]
    assert max(x for x, s in zip(measured["length"], short) if s) < min(x for x, s in zip(measured["length"], short) if not s)

    def padded(order, size=4):  # padding tokens over all batches
        lens = [measured["length"][i] for i in order]
        return sum(max(b) * len(b) - sum(b) for b in (lens[k:k + size] for k in range(0, len(lens), size)))

    torch.manual_seed(0)
    grouped = list(LengthGroupedSampler(4, lengths=measured["length"]))
    assert sorted(grouped) == list(range(len(measured)))
    assert padded(grouped) < 0.5 * padded(torch.randperm(len(measured)).tolist())

    # recfm's sampler: the same batches by length, but in random order, not longest to shortest
    from recfm.training.trainer import ShuffledLengthGroupedSampler

    torch.manual_seed(0)
    shuffled = list(ShuffledLengthGroupedSampler(measured["length"], 4))
    assert sorted(shuffled) == list(range(len(measured)))
    assert padded(shuffled) < 0.5 * padded(torch.randperm(len(measured)).tolist())
    tops = [max(measured["length"][i] for i in shuffled[k:k + 4]) for k in range(0, len(shuffled) - 4, 4)]
    falls = sum(a >= b for a, b in zip(tops, tops[1:]))
    assert 0.25 < falls / (len(tops) - 1) < 0.75  # batch sizes go up and down; transformers' sampler only falls
    hf_tops = [max(measured["length"][i] for i in grouped[k:k + 4]) for k in range(0, len(grouped) - 4, 4)]
    assert sum(a >= b for a, b in zip(hf_tops, hf_tops[1:])) / (len(hf_tops) - 1) > 0.8

    tight = Collator(render_context(tok, small_default, model.config, 12), ItemImages(small_default, 32), model.config)
    kept, dropped = _measure(rows, tight)
    assert dropped > 0 and len(kept) + dropped == len(rows) and max(kept["length"]) <= 12


def test_item_description_reads_a_repeated_title_once():
    from recfm.training.collate import item_description

    assert item_description("Toy Story (1995)", "Toy Story (1995). Genres: Comedy.") == "Toy Story (1995). Genres: Comedy."
    assert item_description("Lamp", "A lamp for the desk.") == "Lamp. A lamp for the desk."
    assert item_description(None, "Only text") == "Only text" and item_description("Only title", None) == "Only title"
    assert item_description(None, None) == ""
