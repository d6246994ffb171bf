"""Speed of the item prefix trie: build time, and the per-step cost of constrained decoding.

For each catalogue size, random semantic-style codes (4 levels x 256 codes, every item unique, item
tokens placed after a 32K text vocabulary) are built into a `PrefixTrie`. Then, at every depth,
`allowed(prefix)` is timed on random valid prefixes, one call at a time (median and p99, in
microseconds), and so is `TrieLogitsProcessor` on a batch of 8 rows (scores over the whole
vocabulary). Filling a batch x vocabulary tensor with -inf, which any constrained decoder pays, is
timed alone as a floor, so the trie's own share is visible. Torch runs on `--threads` threads (1 by
default: per-step work on an 8 x 33K tensor gains nothing from more, and loses a lot when the cores
are shared).

    python benchmarks/trie_bench.py                    # 10K, 100K, 1M items
    python benchmarks/trie_bench.py --sizes 10000      # quick check

Prints a table and writes benchmarks/results/trie_bench.md and .json (machine, settings, seed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from recfm.tokenizers.trie import PrefixTrie, TrieLogitsProcessor  # noqa: E402


def random_codes(n: int, levels: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n, levels) distinct codes drawn uniformly from k ** levels, in random order."""
    keys = np.zeros(0, dtype=np.int64)
    while len(keys) < n:  # redraw what collided; at 1M of 4.3G codes that is about one round
        keys = np.unique(np.concatenate([keys, rng.integers(0, k**levels, n - len(keys))]))
    keys = rng.permutation(keys)
    return np.stack([keys // k ** (levels - 1 - lv) % k for lv in range(levels)], axis=1)


def percentiles_us(ns: list[int]) -> tuple[float, float]:
    a = np.asarray(ns, dtype=np.float64) / 1e3
    return float(np.median(a)), float(np.percentile(a, 99))


def time_calls(fn, args_list) -> tuple[float, float]:
    """Median and p99 (µs) of fn(*args) over args_list, one timed call each, after a warm-up."""
    for args in args_list[:50]:
        fn(*args)
    gc.collect()
    times = []
    for args in args_list:
        t0 = time.perf_counter_ns()
        fn(*args)
        times.append(time.perf_counter_ns() - t0)
    return percentiles_us(times)


def bench_size(n: int, args, rng: np.random.Generator) -> dict:
    levels, k = args.levels, args.codebook
    ids = random_codes(n, levels, k, rng) + args.text_vocab + np.arange(levels) * k
    vocab = args.text_vocab + levels * k + 1
    eos = vocab - 1

    gc.collect()
    t0 = time.perf_counter()
    trie = PrefixTrie(ids)
    build_s = time.perf_counter() - t0
    result = {
        "items": n, "build_s": build_s, "nodes": trie.n_nodes, "trie_mb": trie.nbytes / 2**20, "depths": [],
    }

    processor = TrieLogitsProcessor(trie, span_start=args.prompt, end_token_id=eos)
    prompt = torch.from_numpy(rng.integers(0, args.text_vocab, (args.batch, args.prompt)))
    scores = torch.randn(args.batch, vocab)
    for d in range(levels + 1):  # depth `levels` is a complete code: only the end token is allowed
        rows = rng.integers(0, n, args.queries)
        prefixes = [(ids[i, :d].tolist(),) for i in rows]
        allowed = time_calls(trie.allowed, prefixes) if d < levels else (float("nan"), float("nan"))
        lookup = time_calls(trie.lookup, prefixes) if d == levels else (float("nan"), float("nan"))
        batches = []
        for _ in range(args.steps):
            span = torch.from_numpy(ids[rng.integers(0, n, args.batch), :d])
            batches.append((torch.cat([prompt, span], dim=1), scores))
        proc = time_calls(processor, batches)
        floor = time_calls(lambda s: torch.full_like(s, -float("inf")), [(scores,)] * args.steps)
        result["depths"].append(
            {"depth": d, "allowed_us": allowed, "lookup_us": lookup, "processor_us": proc,
             "mask_floor_us": floor}
        )
    return result


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def fmt(x: float) -> str:
    return "-" if x != x else f"{x:.1f}"  # NaN (not measured at this depth) prints as "-"


def tables(results: list[dict]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    build_head = ["items", "build (s)", "nodes", "trie (MiB)"]
    build_rows = [
        [f"{r['items']:,}", f"{r['build_s']:.3f}", f"{r['nodes']:,}", f"{r['trie_mb']:.1f}"] for r in results
    ]
    step_head = [
        "items", "depth", "allowed med (µs)", "allowed p99 (µs)", "lookup med (µs)",
        "processor b8 med (µs)", "processor b8 p99 (µs)", "mask floor med (µs)",
    ]
    step_rows = [
        [f"{r['items']:,}", str(d["depth"]), fmt(d["allowed_us"][0]), fmt(d["allowed_us"][1]),
         fmt(d["lookup_us"][0]), fmt(d["processor_us"][0]), fmt(d["processor_us"][1]),
         fmt(d["mask_floor_us"][0])]
        for r in results for d in r["depths"]
    ]
    return build_head, build_rows, step_head, step_rows


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--codebook", type=int, default=256)
    p.add_argument("--queries", type=int, default=20_000, help="allowed() calls timed per depth")
    p.add_argument("--steps", type=int, default=500, help="processor calls timed per depth")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32, help="prompt length before the item span")
    p.add_argument("--text-vocab", type=int, default=32_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trie_bench")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    results = [bench_size(n, args, rng) for n in args.sizes]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    info = machine()

    build_head, build_rows, step_head, step_rows = tables(results)
    console = Console()
    sections = [("trie build", build_head, build_rows), ("per decoding step", step_head, step_rows)]
    for title, head, rows in sections:
        table = Table(title=title)
        for h in head:
            table.add_column(h, justify="right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    console.print(f"machine: {info}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"machine": info, "settings": settings, "results": results}, indent=2) + "\n"
    )
    md = [
        "# Prefix trie speed",
        "",
        f"Random semantic-style codes: {args.levels} levels x {args.codebook} codes, unique per item; "
        f"item tokens after a {args.text_vocab:,}-token text vocabulary. Times in microseconds per call, "
        f"median and p99 over {args.queries:,} `allowed()` calls and {args.steps} processor calls "
        f"(batch {args.batch}, full-vocabulary scores) per depth. Depth {args.levels} is a complete code "
        "(only the end token is allowed). The mask floor is filling the batch x vocabulary scores with -inf, "
        f"which any constrained decoder pays. Build time is one run. Torch threads: {args.threads}.",
        "",
        markdown(build_head, build_rows),
        "",
        markdown(step_head, step_rows),
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()),
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    console.print(f"wrote {args.out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
