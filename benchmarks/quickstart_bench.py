"""How many tuning steps the quickstart should take: the quickstart's model on the built-in default
domain after each tuning length, asked on the validation split (each user's second-to-last item) so the
choice never sees the test items. Next-item prediction by default; `--tasks all` asks every task family
(text, rating, yes/no, images too) and adds a table and a plot of each family's metrics per length.

    python benchmarks/quickstart_bench.py [--tune-steps 150 300] [--seed 0] [--stage valid]
    python benchmarks/quickstart_bench.py --tasks all --max-users 200 --name quickstart_tune_steps_all_tasks

Trains exactly as `recfm quickstart` does (`recfm.cli.quickstart_config`): one pretraining run, then one
tuning run per length from it. Runs go under --work (default ~/.cache/recfm/bench-quickstart), never into
the repository. Writes benchmarks/results/quickstart_tune_steps.md/.json/.png with the machine and settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine as machine_info  # noqa: E402
from common import markdown_table  # noqa: E402
from common import write as write_result  # noqa: E402

VIEWS = (("seen", "prompt (seen template)"), ("held_out", "prompt (held-out template)"),
         ("id_sequence", "identifier-sequence view"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune-steps", type=int, nargs="+", default=[150, 300])
    ap.add_argument("--pretrain-steps", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--stage", default="valid", choices=["valid", "test"])
    ap.add_argument("--tasks", nargs="+", default=["next_item"],
                    help="task families to ask (`all`: every one); next_item is always asked")
    ap.add_argument("--max-users", type=int, default=None, help="users asked (default: all; the quickstart asks 100)")
    ap.add_argument("--id-view-weights", type=float, nargs="*", default=None, metavar="W",
                    help="also rank from the prompts fused with the identifier view at these weights (default: the "
                         "run's own id_view_weight)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "recfm" / "bench-quickstart")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", default="quickstart_tune_steps")
    args = ap.parse_args()

    from recfm.cli import QUICKSTART_TOKENIZERS, quickstart_config
    from recfm.data.synthetic import SyntheticConfig, prepare_default
    from recfm.eval.runner import evaluate
    from recfm.instructions.examples import TASKS
    from recfm.tokenizers.build import tokenize_domain
    from recfm.training import train

    work = args.work / f"seed{args.seed}"
    domain_dir, tok_dir, pre_dir = work / "domain", work / "tokenizers", work / f"pretrain-{args.pretrain_steps}"
    if not (domain_dir / "domain.json").exists():
        prepare_default(domain_dir, SyntheticConfig(seed=args.seed))
    if not (tok_dir / "tokenizers.json").exists():
        tokenize_domain(domain_dir, tok_dir, **QUICKSTART_TOKENIZERS, seed=args.seed, progress=False)
    if not (pre_dir / "run.json").exists():
        train(quickstart_config("pretrain", domain_dir, pre_dir, tok_dir, args.pretrain_steps, args.preset, args.seed),
              progress=False)
    tasks = list(TASKS) if "all" in args.tasks else ["next_item", *(t for t in args.tasks if t != "next_item")]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise SystemExit(f"--tasks: unknown task families {sorted(unknown)}; known: {', '.join(TASKS)} or all")
    raw, rows, baselines = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, [], {}
    for steps in args.tune_steps:
        run = work / f"{pre_dir.name}-tune-{steps}"
        if not (run / "run.json").exists():
            train(quickstart_config("tune", domain_dir, run, pre_dir, steps, args.preset, args.seed), progress=False)
        tune_s = json.loads((run / "run.json").read_text())["train_runtime_s"]
        report = evaluate(run, domain_dir, tasks=tasks, stage=args.stage, seed=args.seed, progress=True,
                          id_view_weight=args.id_view_weights, max_users=args.max_users)
        fused = report["tasks"].get("next_item_fused", {})
        raw[f"tune{steps}"] = {"tune_s": tune_s, "users": report["users"], "next_item": report["tasks"]["next_item"],
                               "next_item_fused": fused,
                               "other_tasks": {t: v for t, v in report["tasks"].items() if not t.startswith("next_item")}}
        baselines = report["baselines"]
        for view, label in VIEWS:
            m = report["tasks"]["next_item"].get(view)
            if m:
                rows.append([f"recfm, {steps} tuning steps", label, m["hr@10"], m["ndcg@10"], m["mrr"], tune_s])
        for w, by in fused.items():  # the prompts fused with the identifier view (recfm.foundation.generation.fused_scores)
            for view, label in VIEWS[:2]:
                m = by[view]
                rows.append([f"recfm, {steps} tuning steps", f"{label} + identifier view ×{w}", m["hr@10"], m["ndcg@10"],
                             m["mrr"], tune_s])
    for name in ("popularity", "content_profile", "oracle", "text_only_oracle"):
        if name in baselines:
            m = baselines[name]
            rows.append([name.replace("_", " "), "-", m["hr@10"], m["ndcg@10"], m["mrr"], 0.0])
    raw["baselines"] = baselines
    raw["machine"] = machine_info()
    users = next(v["users"] for k, v in raw.items() if k.startswith("tune"))
    asked = "validation (each user's second-to-last item)" if args.stage == "valid" else "test"
    lines = [
        "# Quickstart tuning length on the default domain", "",
        f"Leave-one-out {asked}, full ranking over all items, history masked, {users} users. recfm as `recfm quickstart` "
        f"trains it: `{args.preset}` preset, seed {args.seed}, {args.pretrain_steps} pretraining steps, then each tuning "
        "length from that one pretrained model. tune (s): wall-clock seconds of tuning.", "",
        markdown_table(["ranker", "view", "hr@10", "ndcg@10", "mrr", "tune (s)"], rows), ""]
    other = other_task_rows(raw, args.tune_steps, baselines)
    if other:
        lines += ["The other task families on the same users, each tuning length (seen / held-out template) against "
                  "its baseline:", "",
                  markdown_table(["task", "metric", *(f"{s} steps" for s in args.tune_steps), "baseline"], other), ""]
    lines += [f"Machine: {json.dumps(raw['machine'])}", f"Settings: {json.dumps(raw['settings'])}"]
    stem = write_result(args.name, "\n".join(lines), raw, args.out)
    plot(raw, args.tune_steps, stem.with_suffix(".png"))
    if other:
        plot_other_tasks(raw, args.tune_steps, baselines, stem.with_name(stem.stem + "_tasks.png"))
    print("\n".join(lines))


def other_task_rows(raw: dict, tune_steps: list[int], baselines: dict) -> list[list]:
    """One row per (task, metric) of the families other than next-item prediction: "seen / held-out" at
    each tuning length, then the family's baseline."""
    from recfm.eval.report import BASELINE_OF

    first = raw[f"tune{tune_steps[0]}"]["other_tasks"]
    rows = []
    for task, by in first.items():
        base = baselines.get(BASELINE_OF.get(task, ""), {})
        for metric in next(iter(by.values())):
            cells = []
            for s in tune_steps:
                got = raw[f"tune{s}"]["other_tasks"].get(task, {})
                cells.append(" / ".join(f"{got[v][metric]:.3f}" if metric in got.get(v, {}) else "-"
                                        for v in ("seen", "held_out")))
            rows.append([task.replace("_", " "), metric, *cells, f"{base[metric]:.3f}" if metric in base else "-"])
    return rows


def plot_other_tasks(raw: dict, tune_steps: list[int], baselines: dict, out: Path) -> None:
    """Each other task family's first metric per tuning length (seen and held-out templates), its
    baseline as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recfm.eval.report import BASELINE_OF

    tasks = list(raw[f"tune{tune_steps[0]}"]["other_tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.6 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        by = raw[f"tune{tune_steps[0]}"]["other_tasks"][task]
        metric = next(iter(next(iter(by.values()))))
        for view, style in (("seen", "o-"), ("held_out", "s--")):
            pts = [(s, raw[f"tune{s}"]["other_tasks"][task][view][metric]) for s in tune_steps
                   if metric in raw[f"tune{s}"]["other_tasks"].get(task, {}).get(view, {})]
            if pts:
                ax.plot(*zip(*pts), style, label=view.replace("_", "-"))
        base = baselines.get(BASELINE_OF.get(task, ""), {})
        if metric in base:
            ax.axhline(base[metric], linestyle=":", color="grey", label="baseline")
        ax.set_title(f"{task.replace('_', ' ')}\n{metric}", fontsize=8)
        ax.set_xlabel("tuning steps", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot(raw: dict, tune_steps: list[int], out: Path) -> None:
    """NDCG@10 of each view per tuning length, the baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for view, label in VIEWS:
        pts = [(s, raw[f"tune{s}"]["next_item"][view]["ndcg@10"]) for s in tune_steps
               if view in raw[f"tune{s}"]["next_item"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    weights = sorted({w for s in tune_steps for w in raw[f"tune{s}"].get("next_item_fused", {})}, key=float)
    for w in weights:
        pts = [(s, raw[f"tune{s}"]["next_item_fused"][w]["seen"]["ndcg@10"]) for s in tune_steps
               if w in raw[f"tune{s}"].get("next_item_fused", {})]
        ax.plot(*zip(*pts), marker="s", label=f"prompt (seen) + identifier view ×{w}")
    for name, colour in (("popularity", "grey"), ("content_profile", "silver")):
        if name in raw["baselines"]:
            ax.axhline(raw["baselines"][name]["ndcg@10"], linestyle="--", color=colour, label=name.replace("_", " "))
    ax.set_xlabel("tuning steps")
    ax.set_ylabel("NDCG@10")
    ax.set_title("quickstart model on the default domain")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
