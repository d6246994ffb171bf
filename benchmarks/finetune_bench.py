"""Fine-tuning a trained model on a new domain (`recfm finetune`), measured by next-item prediction there.

    python benchmarks/finetune_bench.py --base RUN [--input ../shared/data/amazon-musical-instruments-5core]

RUN is a tuned content-id run, e.g. MovieLens's words model from

    python benchmarks/recommend_bench.py --domain ~/.cache/recfm/data/ml-100k \\
        --variants early-content-words-noitemimg --no-sasrec --pretrain-steps 400 --tune-steps 150

(under ~/.cache/recfm/bench/ml-100k/early-content-words-noitemimg-s0). The new domain is Amazon Musical
Instruments (no item images; an item's text is the summaries of its training-split reviews). Variants:

- `grow`: LoRA fine-tuning; the word vocabulary grows with the new domain's shared words (the default).
- `keep`: the same, reading the new domain with the old domain's words only (`item_word_grow: false`).
- `scratch`: a content-id model of the same settings trained on the new domain alone (pretraining +
  tuning, its own tokenizers), for what the old domain's training is worth.

Leave-one-out test, full ranking over every item, the user's history masked, beside popularity and the
content profile, with paired tests per user. Runs go under --work, never into the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AMAZON_INPUT, amazon_domain  # noqa: E402
from common import machine as machine_info  # noqa: E402
from common import markdown_table  # noqa: E402
from common import write as write_result  # noqa: E402
from recommend_bench import METRICS, result  # noqa: E402

VARIANTS = ("grow", "keep", "scratch")
TASKS = {"next_item": 2.0, "id_sequence": 1.0}  # next-item prompts and the identifier-only rows


def run_variant(variant: str, args, data_dir: Path, work: Path) -> dict:
    from recfm.eval.runner import evaluate
    from recfm.training import TrainConfig, train

    common = dict(domain=str(data_dir), seed=args.seed, batch_size=8, logging_steps=20, save_steps=10_000,
                  max_history=args.max_history, max_tokens=1024, tasks=TASKS, answer_distill=args.answer_distill)
    distill = f"-d{args.answer_distill:g}" if args.answer_distill else ""
    out = work / f"{variant}-s{args.seed}-t{args.steps}{distill}"
    stages = [out]  # the run folders whose recorded training time the row states
    if variant == "scratch":
        from recfm.tokenizers.build import tokenize_domain

        tok_dir = work / "tokenizers"
        if not (tok_dir / "tokenizers.json").exists():
            tokenize_domain(data_dir, tok_dir, vocab_size=4096, progress=False)
        base = json.loads((args.base / "config.json").read_text())
        model = dict(item_mode="content", item_text=base.get("item_text", "tokens"),
                     item_id_residual=base.get("item_id_residual", True), item_image=base.get("item_image", True),
                     vision=None, preset=args.preset)
        pre = work / f"scratch-s{args.seed}-p{args.scratch_pretrain_steps}-pre"
        if not (pre / "run.json").exists():
            train(TrainConfig(stage="pretrain", tokenizers=str(tok_dir), output=str(pre), max_steps=args.scratch_pretrain_steps,
                              lr=2e-3, **model, **common), progress=False)
        out = work / f"scratch-s{args.seed}-p{args.scratch_pretrain_steps}-t{args.steps}{distill}"
        stages = [pre, out]
        if not (out / "run.json").exists():
            train(TrainConfig(stage="tune", init_from=str(pre), output=str(out), max_steps=args.steps, lr=1e-3, **common),
                  progress=False)
    elif not (out / "run.json").exists():
        train(TrainConfig(stage="finetune", init_from=str(args.base), output=str(out), max_steps=args.steps, lr=args.lr,
                          item_word_grow=variant == "grow", **common), progress=False)
    recorded = sum(json.loads((r / "run.json").read_text())["train_runtime_s"] or 0 for r in stages)
    config = json.loads((out / "config.json").read_text())
    report = evaluate(out, data_dir, tasks=["next_item"], seed=args.seed, progress=True)
    r = result(report, recorded)
    r["words"] = len(config.get("item_word_vocab") or [])
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a tuned content-id run folder to fine-tune")
    ap.add_argument("--input", type=Path, default=AMAZON_INPUT, help="an Amazon reviews 5-core file or its folder")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning (and the scratch model's tuning) steps, batch 8")
    ap.add_argument("--scratch-pretrain-steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (LoRA and the item encoder)")
    ap.add_argument("--preset", default="small", help="the scratch model's size")
    ap.add_argument("--max-history", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--answer-distill", type=float, default=0.0,
                    help="answer_distill of the fine-tuning (and scratch tuning) runs; the committed tables ran with 0")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "recfm" / "bench-finetune")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", default="finetune_amazon")
    args = ap.parse_args()
    if not (args.base / "config.json").exists():
        sys.exit(f"{args.base} is not a run folder (no config.json); see this script's --help for how to train one")
    base_cfg = json.loads((args.base / "config.json").read_text())
    if base_cfg.get("item_mode") != "content":
        sys.exit(f"{args.base} has {base_cfg.get('item_mode')} item ids; only content ids carry over to a new domain")

    from recfm.eval.metrics import paired_test

    data_dir = amazon_domain(args.input)
    work = args.work / "amazon"
    work.mkdir(parents=True, exist_ok=True)
    runs = {v: run_variant(v, args, data_dir, work) for v in args.variants}
    base_words = len(base_cfg.get("item_word_vocab") or [])
    first = next(iter(runs.values()))
    users = sorted(first["per_user_ndcg"])
    rows = []
    for v, r in runs.items():
        for view, label in (("seen", "seen template"), ("held_out", "held-out template"), ("id_sequence", "identifier view")):
            if r.get(view):
                rows.append([f"recfm {v} ({label})", *(r[view][k] for k in METRICS), r["words"], r["train_s"]])
    for name, m in first["baselines"].items():
        if isinstance(m, dict) and "hr@10" in m:
            rows.append([name.replace("_", " "), *(m[k] for k in METRICS), "", 0.0])
    tests = []  # NDCG@10 per user, seen template, paired over the same users
    for v, r in runs.items():
        t = r["vs_popularity"]
        tests.append(f"- {v} vs popularity: {t['mean_diff']:+.4f} per user over {t['n']} users, p = {t['p_value']:.3g}")
        if r.get("id_view_vs_popularity"):
            t = r["id_view_vs_popularity"]
            tests.append(f"- {v}, identifier view, vs popularity: {t['mean_diff']:+.4f} per user, p = {t['p_value']:.3g}")
    for a, b in combinations(runs, 2):
        d = paired_test([runs[a]["per_user_ndcg"][u] for u in users], [runs[b]["per_user_ndcg"][u] for u in users])
        tests.append(f"- {a} vs {b}: {d['mean_diff']:+.4f} per user, p = {d['p_value']:.3g}")
    machine = machine_info()
    md = "\n".join([
        f"# Fine-tuning on a new domain: {base_cfg.get('item_mode')} ids from `{args.base.name}` to Amazon Musical Instruments", "",
        f"Leave-one-out test, full ranking over the new domain's items, history masked, {first['users']} users, seed "
        f"{args.seed}. Fine-tuning: LoRA r=8 on the language model's attention plus the whole item encoder, {args.steps} "
        f"steps of batch 8, lr {args.lr}, tasks {TASKS}. The base run reads items by {base_words} words "
        f"(item_text {base_cfg.get('item_text')}, residual {base_cfg.get('item_id_residual')}, item image "
        f"{base_cfg.get('item_image')}). scratch: the same content settings, no vision tower, {args.scratch_pretrain_steps} "
        f"pretraining + {args.steps} tuning steps on the new domain alone. words: the model's word vocabulary after training. "
        "train (s): recorded training time of the run's stages.", "",
        markdown_table(["ranker", *METRICS, "words", "train (s)"], rows), "", *tests, "",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, torch {machine['torch']}.",
    ])
    raw = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "machine": machine,
           "base_words": base_words, "runs": {v: {k: x for k, x in r.items() if k != "per_user_ndcg"} for v, r in runs.items()},
           "tests": tests}
    path = write_result(args.name, md, raw, args.out)
    plot(runs, first["baselines"], path.with_suffix(".png"))
    print(md)


def plot(runs: dict, baselines: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{v} (prompt)" for v in runs] + [f"{v} (ids)" for v, r in runs.items() if r.get("id_sequence")]
    vals = [r["seen"]["ndcg@10"] for r in runs.values()] + [r["id_sequence"]["ndcg@10"] for r in runs.values() if r.get("id_sequence")]
    for k in ("popularity", "content_profile"):
        if k in baselines:
            names.append(k.replace("_", " "))
            vals.append(baselines[k]["ndcg@10"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(len(vals)), vals)
    ax.set_xticks(np.arange(len(vals)), names, rotation=20, ha="right")
    ax.set_ylabel("NDCG@10")
    ax.set_title("next item on Amazon Musical Instruments after fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
