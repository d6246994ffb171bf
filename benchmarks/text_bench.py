"""Explanation and review generation, and rating prediction, on Amazon reviews: recfm against two
retrieval baselines (the item's training review most similar to the user's own reviews; the item's
latest training review) and the user/item mean rating.

    python benchmarks/text_bench.py [--input ../shared/data/amazon-musical-instruments-5core]
        [--seeds 0] [--pretrain-steps N --tune-steps N --max-users N] [--name STEM] [--baselines-only]

--baselines-only scores the baselines on the same requests without training a model (seconds).

Leave-one-out by time; the test review of each user is the reference. The converted domain, the
tokenizers and the runs go under --work (default ~/.cache/recfm/bench), never into the repository.
Writes benchmarks/results/text_<domain>.md/.json/.png with the machine and every setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import AMAZON_INPUT, amazon_domain  # noqa: E402
from common import machine as machine_info  # noqa: E402
from common import write as write_result  # noqa: E402

TASKS = ("explanation", "review", "rating")
TEXT_METRICS = ("bleu4", "rouge1", "rouge2", "rougeL")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, default=AMAZON_INPUT, help="an Amazon reviews 5-core file or its folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--tune-steps", type=int, default=1000, help="300 left the model answering \"5\" to every text request")
    ap.add_argument("--max-history", type=int, default=10)
    ap.add_argument("--max-users", type=int, default=300, help="test users evaluated (generation is the slow part)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "recfm" / "bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", help="result file stem (default text_<domain>)")
    ap.add_argument("--baselines-only", action="store_true", help="score only the baselines, on the same requests")
    args = ap.parse_args()
    data_dir = amazon_domain(args.input)

    from recfm.eval.runner import evaluate
    from recfm.tokenizers.build import tokenize_domain
    from recfm.training import TrainConfig, train

    work = args.work / "amazon"
    tok_dir = work / "tokenizers"
    if not (tok_dir / "tokenizers.json").exists():
        tokenize_domain(data_dir, tok_dir, vocab_size=4096, progress=False)
    raw: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": {}}
    rows = []
    baselines = None
    if args.baselines_only:
        baselines = baselines_only(data_dir, args)
    for seed in [] if args.baselines_only else args.seeds:
        common = dict(domain=str(data_dir), preset=args.preset, seed=seed, batch_size=8, logging_steps=20,
                      save_steps=10_000, max_history=args.max_history, max_tokens=1024)
        t0 = time.perf_counter()
        pre = work / f"s{seed}-p{args.pretrain_steps}-pre"  # runs of other step counts are not reused
        if not (pre / "run.json").exists():
            train(TrainConfig(stage="pretrain", tokenizers=str(tok_dir), output=str(pre), vision=None,
                              max_steps=args.pretrain_steps, lr=2e-3, **common), progress=False)
        run = work / f"s{seed}-p{args.pretrain_steps}-t{args.tune_steps}"
        if not (run / "run.json").exists():
            train(TrainConfig(stage="tune", init_from=str(pre), output=str(run), max_steps=args.tune_steps, lr=1e-3,
                              tasks={"explanation": 1.0, "review": 1.0, "rating": 1.0}, **common), progress=False)
        train_s = sum(json.loads((p / "run.json").read_text())["train_runtime_s"] or 0 for p in (pre, run))
        t1 = time.perf_counter()
        report = evaluate(run, data_dir, tasks=list(TASKS), max_users=args.max_users, seed=seed, progress=True)
        eval_s = time.perf_counter() - t1
        baselines = report["baselines"]
        raw["runs"][f"seed{seed}"] = {"tasks": report["tasks"], "baselines": baselines, "train_s": train_s,
                                      "eval_s": eval_s, "wall_s": time.perf_counter() - t0,
                                      "examples": {t: report["per_example"].get(t, [])[:5] for t in ("explanation", "review")}}
        for task in TASKS:
            for which in ("seen", "held_out"):
                m = report["tasks"].get(task, {}).get(which)
                if m:
                    rows.append((f"recfm {task} ({which.replace('_', '-')} template)", seed, task, m))
    for task in ("explanation", "review"):
        for key, label in (("retrieval", "most similar review of the item"), ("item_latest", "latest review of the item")):
            if baselines and f"{task}_{key}" in baselines:
                rows.append((f"retrieval {task} ({label})", "-", task, baselines[f"{task}_{key}"]))
    if baselines and "rating_user_item_mean" in baselines:
        rows.append(("user/item mean rating", "-", "rating", baselines["rating_user_item_mean"]))
    machine = machine_info()
    raw["machine"], raw["baselines"] = machine, baselines
    from recfm.data import load_domain

    domain = load_domain(data_dir)
    lines = [f"# Text generation and rating prediction on {domain.name}", "",
             f"Leave-one-out test (each user's last review), the first {args.max_users} test users, first seen and first "
             f"held-out template per task. "
             + ("Baselines only: no model was trained. " if args.baselines_only else
                f"recfm: `{args.preset}` preset, text only (the data has no images), {args.pretrain_steps} pretraining "
                f"+ {args.tune_steps} tuning steps of batch 8 over explanation, review and rating, history "
                f"{args.max_history} items, greedy answers of at most 48 tokens. ")
             + "BLEU-4 (sacrebleu) and ROUGE (rouge-score) in percent of the whole test review. Retrieval answers with a training review of the "
             "requested item by another user, in full: the one most similar to the user's own training reviews (TF-IDF "
             "cosine), or the latest. Rating: the expected value over the digits 1-5.", "",
             "| system | seed | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | RMSE | MAE |", "|---|---|---|---|---|---|---|---|"]
    for name, seed, task, m in rows:
        cells = [f"{m[k]:.2f}" if k in m else "" for k in TEXT_METRICS] + [f"{m[k]:.3f}" if k in m else "" for k in ("rmse", "mae")]
        lines.append("| " + " | ".join([name, str(seed), *cells]) + " |")
    for key, r in raw["runs"].items():
        lines += ["", f"{key}: training {r['train_s']:.0f} s, evaluation {r['eval_s']:.0f} s."]
    lines += ["", f"Machine: {json.dumps(machine)}", f"Settings: {json.dumps(raw['settings'])}"]
    stem = write_result(args.name or f"text_{domain.name}", "\n".join(lines), raw, args.out)
    plot(rows, stem.with_suffix(".png"), domain.name)
    print("\n".join(lines))


def baselines_only(data_dir: Path, args) -> dict:
    """The baselines on the requests `evaluate` would score (first seen and held-out template, the first
    --max-users test users, seed 0's draws), without a model."""
    from recfm.data import load_domain, make_split
    from recfm.eval.runner import eval_rows, text_baselines

    domain = load_domain(data_dir)
    split = make_split(domain, "leave_one_out")
    return text_baselines(split, eval_rows(domain, split, "test", list(TASKS), args.max_users, args.seeds[0]))


def plot(rows, out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    text = [(n, m) for n, _, t, m in rows if t != "rating"]
    labels = [n.replace(" template", "").replace(" review of the item", "") for n, _ in text]
    for k, metric in enumerate(("bleu4", "rougeL")):
        axes[0].barh([y + 0.4 * k for y in range(len(text))], [m.get(metric, 0) for _, m in text], height=0.4,
                     label=metric)
    axes[0].set_yticks([y + 0.2 for y in range(len(text))], labels, fontsize=7)
    axes[0].set_xlabel("percent")
    axes[0].legend()
    axes[0].set_title("explanation / review generation")
    rating = [(n, m) for n, _, t, m in rows if t == "rating"]
    axes[1].barh(range(len(rating)), [m["rmse"] for _, m in rating])
    axes[1].set_yticks(range(len(rating)), [n.replace(" template", "") for n, _ in rating], fontsize=7)
    axes[1].set_xlabel("RMSE (lower is better)")
    axes[1].set_title("rating")
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
