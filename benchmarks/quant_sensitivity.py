"""Which decoder linears a 4-bit option should keep at int8: each layout's weight bytes against how far
its next-item scores move from the fp32 model's.

For each run and each layout, the run is loaded, quantized with that layout and asked the next-item
prompt (first seen template) of its first --users test users, full ranking over the catalogue with the
history masked. Reported against the fp32 model on the same prompts:

- KL(fp32 || quantized) of the softmax over the catalogue, mean over users (fidelity: it needs no
  held-out label, so it separates layouts that NDCG@10, at a few hundred users, cannot);
- top-10 overlap: the share of fp32's ten best items the quantized model also ranks in its ten best;
- NDCG@10 (and its change), weight bytes as a fraction of fp32.

A layout is `int8` (the int8 option, for reference), `4bit` (every decoder linear 4-bit), `default`
(what `--quantization nf4/fp4` ships:
`quantization.int8_in_4bit`), or comma-separated KIND@LAYERS terms kept at int8, KIND one of attn, mlp,
all, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, LAYERS like 0, 0-2 or * (e.g.
`attn@0`, `all@0`, `down_proj@*`).

    python benchmarks/quant_sensitivity.py --runs runs/quickstart/run ~/.cache/recfm/bench/ml-100k/early-atomic-s0

Writes benchmarks/results/quant_sensitivity.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, write  # noqa: E402

LAYOUTS = ["4bit", "default", "all@0", "all@1", "all@2", "all@3", "all@4", "all@5", "attn@0", "mlp@0", "attn@0-1",
           "q_proj@*", "k_proj@*", "v_proj@*", "o_proj@*", "gate_proj@*", "up_proj@*", "down_proj@*"]
KINDS = {"attn": ("self_attn.",), "mlp": ("mlp.",), "all": ("",)}


def layout_rule(layout: str):
    """The keep_int8(layer, name) predicate of a layout string."""
    from recfm.serving.quantization import int8_in_4bit

    if layout in ("default", "int8"):  # int8: the int8 option itself, for reference (every layer at int8)
        return int8_in_4bit
    if layout == "4bit":
        return lambda layer, name: False
    terms = []
    for term in layout.split(","):
        kind, _, layers = term.partition("@")
        prefixes = KINDS.get(kind, (f"self_attn.{kind}", f"mlp.{kind}"))
        if layers in ("", "*"):
            span = None
        else:
            lo, _, hi = layers.partition("-")
            span = range(int(lo), int(hi or lo) + 1)
        terms.append((prefixes, span))
    return lambda layer, name: any((span is None or layer in span) and any(name.startswith(p) for p in prefixes)
                                   for prefixes, span in terms)


def prompts(run, domain, users: int):
    from recfm.data import make_split
    from recfm.instructions.examples import build_eval_examples

    split = make_split(domain, "leave_one_out")
    rows = [r for r in build_eval_examples(domain, split, stage="test", tasks=["next_item"], max_users=users, seed=0)
            if not r["held_out"]]
    first = rows[0]["template_id"]
    rows = [r for r in rows if r["template_id"] == first]
    tests = split.test.select(range(min(users, len(split.test))))
    masked = {e["user_id"]: list(e["history"]) for e in tests}
    return rows, masked


@torch.no_grad()
def scores_and_ranks(run, rows, masked) -> tuple[torch.Tensor, np.ndarray]:
    """All rows' catalogue scores (history masked) and their targets' 0-based ranks."""
    from recfm.eval.metrics import target_ranks
    from recfm.eval.runner import ranking_scores

    scores, ranks = [], []
    for _, s, targets in ranking_scores(run, rows, masked, progress=False):
        scores.append(s.float())
        ranks += target_ranks(s.numpy(), targets).tolist()
    return torch.cat(scores), np.asarray(ranks)


def measure_run(run_dir: Path, option: str, layouts: list[str], users: int) -> list[dict]:
    from tqdm.auto import tqdm

    from recfm.data import load_domain
    from recfm.eval.metrics import ndcg_per_user, paired_test
    from recfm.eval.runner import LoadedRun
    from recfm.serving.quantization import load_quantized, quantize, weight_bytes

    domain = load_domain(json.loads((run_dir / "run.json").read_text())["domain"])
    run = LoadedRun(run_dir, domain)
    rows, masked = prompts(run, domain, users)
    full_bytes = weight_bytes(run.model)
    base_s, base_r = scores_and_ranks(run, rows, masked)
    finite = torch.isfinite(base_s)
    log_p = torch.log_softmax(base_s.masked_fill(~finite, -1e30), -1)
    top_p = base_s.topk(10).indices
    base_nd = ndcg_per_user(base_r)
    name = f"{run_dir.parent.name}/{run_dir.name}"
    out = [{"run": name, "layout": "fp32", "weight_fraction": 1.0, "kl": 0.0, "top10_overlap": 1.0,
            "ndcg@10": float(base_nd.mean()), "ndcg_change": 0.0, "p": 1.0, "users": len(rows), "secs": 0.0}]
    for layout in tqdm(layouts, desc=f"{run_dir.name} layouts"):
        t0 = time.time()
        model = load_quantized(run_dir, "none")
        quantize(model, "int8" if layout == "int8" else option, keep_int8=layout_rule(layout))
        run.model = model
        s, r = scores_and_ranks(run, rows, masked)
        log_q = torch.log_softmax(s.masked_fill(~finite, -1e30), -1)
        kl = (log_p.exp() * (log_p - log_q)).masked_fill(~finite, 0).sum(-1).mean().item()
        top = s.topk(10).indices
        overlap = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top, top_p)]))
        nd = ndcg_per_user(r)
        out.append({"run": name, "layout": layout, "weight_fraction": weight_bytes(model) / full_bytes, "kl": kl,
                    "top10_overlap": overlap, "ndcg@10": float(nd.mean()),
                    "ndcg_change": float(nd.mean() / base_nd.mean() - 1) if base_nd.mean() else float("nan"),
                    "p": paired_test(nd, base_nd)["p_value"], "users": len(rows), "secs": time.time() - t0})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path, required=True)
    ap.add_argument("--option", default="nf4", choices=["nf4", "fp4"])
    ap.add_argument("--layouts", nargs="+", default=LAYOUTS)
    ap.add_argument("--users", type=int, default=200, help="test users per run (the first ones)")
    ap.add_argument("--name", default="quant_sensitivity", help="result file stem")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = []
    for run in args.runs:
        results += measure_run(run, args.option, args.layouts, args.users)
    rows = [[r["run"], r["layout"], f"{r['weight_fraction']:.3f}", f"{r['kl']:.5f}", f"{r['top10_overlap']:.3f}",
             f"{r['ndcg@10']:.4f}", f"{r['ndcg_change'] * 100:+.1f}", f"{r['p']:.2f}"] for r in results]
    head = ["run", "layout (kept at int8)", "of fp32 bytes", "KL to fp32", "top-10 overlap", "NDCG@10", "change %",
            "paired p"]
    md = (f"# 4-bit layouts: bytes against distance from fp32 ({args.option})\n\n"
          f"Machine: {machine()}. Next-item prompt (first seen template) of the first {args.users} test users of each "
          "run, full ranking over the catalogue, history masked. KL: mean over users of KL(fp32 || quantized) of the "
          "softmax over the catalogue; top-10 overlap: share of fp32's ten best items among the quantized model's ten "
          "best; paired p: sign-flip test of per-user NDCG@10 against fp32. Layout: what stays int8 besides the "
          "output head, vision tower and projector (which are int8 in every 4-bit layout); `4bit`: every decoder "
          "linear at 4 bits; `default`: what the option ships.\n\n"
          + markdown_table(head, rows) + "\n")
    path = write(args.name, md, {"option": args.option, "users": args.users, "machine": machine(), "results": results})
    plot(results, args.option, path.with_suffix(".png"))
    print(md)


def plot(results, option, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in results))
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs):
        rs = [r for r in results if r["run"] == run and r["layout"] != "fp32"]
        ax.scatter([r["weight_fraction"] for r in rs], [r["kl"] for r in rs])
        for r in rs:
            ax.annotate(r["layout"], (r["weight_fraction"], r["kl"]), fontsize=7)
        ax.axvline(0.18, color="grey", ls="--", lw=0.8)
        ax.set(title=f"{run} ({option})", xlabel="weight bytes / fp32", ylabel="KL(fp32 || quantized)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
