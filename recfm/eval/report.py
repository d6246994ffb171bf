"""Tables of an evaluation report (rich), and markdown for benchmark results."""

from __future__ import annotations

from rich.table import Table

RANK_COLS = ("hr@5", "hr@10", "hr@20", "ndcg@10", "mrr")
# the baseline each task family other than next-item prediction is shown against
BASELINE_OF = {"pick_candidate": "pick_candidate_random", "yes_no": "yes_no_popularity", "rating": "rating_user_item_mean",
               "explanation": "explanation_retrieval", "review": "review_retrieval",
               "image_generation": "image_generation_unpersonalized"}


def ranking_rows(report: dict, among_new: bool = False) -> list[tuple[str, dict]]:
    """(ranker, metrics) of next-item prediction: over the whole catalogue, or (cold-item split,
    `among_new`) with the targets ranked among the new items alone."""
    task, baselines = ("next_item_among_new", "baselines_among_new") if among_new else ("next_item", "baselines")
    rows = [("recfm (identifier-sequence view)" if k == "id_sequence" else f"recfm ({k.replace('_', '-')} templates)", v)
            for k, v in report["tasks"].get(task, {}).items()]
    rows += [(f"recfm ({k.replace('_', '-')} templates, fused with the identifier view at {w})", v)
             for w, by in report["tasks"].get(f"{task}_fused", {}).items() for k, v in by.items()]
    rows += [(k.replace("_", " "), v) for k, v in report.get(baselines, {}).items() if isinstance(v, dict) and "hr@10" in v]
    return rows


def print_report(report: dict, console) -> None:
    oracle = report["baselines"].get("oracle")
    cols = RANK_COLS + (("median_rank",) if report.get("split") == "cold_items" else ())
    titles = {False: f"next item, full ranking over the catalogue ({report['domain']}, {report['stage']}, {report['users']} users)",
              True: f"the same targets ranked among the {report.get('cold_items')} new items alone"}
    for among_new in (False, True):
        rows = ranking_rows(report, among_new)
        if not rows:
            continue
        t = Table(title=titles[among_new])
        t.add_column("ranker")
        for c in cols:
            t.add_column(c.replace("_", " "), justify="right")
        if oracle:
            t.add_column("NDCG@10 / oracle", justify="right")
        for name, m in rows:
            extra = [f"{m['ndcg@10'] / oracle['ndcg@10']:.2f}"] if oracle else []
            t.add_row(name, *(f"{m[c]:.{1 if c == 'median_rank' else 4}f}" for c in cols), *extra)
        console.print(t)
    o = Table(title="other tasks (seen / held-out templates; baseline)")
    for c in ("task", "metric", "seen", "held-out", "baseline"):
        o.add_column(c, justify="left" if c in ("task", "metric") else "right")
    for task, by in report["tasks"].items():
        if task.startswith("next_item"):
            continue
        base = report["baselines"].get(BASELINE_OF.get(task, ""), {})
        metrics = list(next(iter(by.values())).keys())
        for m in metrics:
            fmt = lambda d: f"{d[m]:.3f}" if d and m in d else "-"
            o.add_row(task.replace("_", " "), m, fmt(by.get("seen")), fmt(by.get("held_out")), fmt(base))
    if o.row_count:
        console.print(o)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        return f"{x:.4f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)
