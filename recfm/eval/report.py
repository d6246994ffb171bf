"""Tables of an evaluation report (rich), and markdown for benchmark results."""

from __future__ import annotations

from rich.table import Table

RANK_COLS = ("hr@5", "hr@10", "hr@20", "ndcg@10", "mrr")


def ranking_rows(report: dict) -> list[tuple[str, dict]]:
    rows = [("recfm (identifier-sequence view)" if k == "id_sequence" else f"recfm ({k.replace('_', '-')} templates)", v)
            for k, v in report["tasks"].get("next_item", {}).items()]
    rows += [(k.replace("_", " "), v) for k, v in report["baselines"].items() if isinstance(v, dict) and "hr@10" in v]
    return rows


def print_report(report: dict, console) -> None:
    oracle = report["baselines"].get("oracle")
    t = Table(title=f"next item, full ranking over the catalogue ({report['domain']}, {report['stage']}, {report['users']} users)")
    t.add_column("ranker")
    for c in RANK_COLS:
        t.add_column(c, justify="right")
    if oracle:
        t.add_column("NDCG@10 / oracle", justify="right")
    for name, m in ranking_rows(report):
        extra = [f"{m['ndcg@10'] / oracle['ndcg@10']:.2f}"] if oracle else []
        t.add_row(name, *(f"{m[c]:.4f}" for c in RANK_COLS), *extra)
    console.print(t)
    o = Table(title="other tasks (seen / held-out templates; baseline)")
    for c in ("task", "metric", "seen", "held-out", "baseline"):
        o.add_column(c, justify="left" if c in ("task", "metric") else "right")
    baseline_of = {"pick_candidate": "pick_candidate_random", "rating": "rating_user_item_mean",
                   "explanation": "explanation_retrieval", "review": "review_retrieval",
                   "image_generation": "image_generation_unpersonalized"}
    for task, by in report["tasks"].items():
        if task == "next_item":
            continue
        base = report["baselines"].get(baseline_of.get(task, ""), {})
        metrics = list(next(iter(by.values())).keys())
        for m in metrics:
            fmt = lambda d: f"{d[m]:.3f}" if d and m in d else "-"
            o.add_row(task.replace("_", " "), m, fmt(by.get("seen")), fmt(by.get("held_out")), fmt(base))
    console.print(o)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        return f"{x:.4f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)
