"""int8 linear layers on this CPU: recfm's weight-only `Int8Linear` against the library paths it could
have used instead, on the `small` preset's projection shapes.

For each (rows, in, out) shape and each path: the median time of one product (after warm-up), its
ratio to fp32's `F.linear`, and its relative error against the fp32 product, on the same random
weights (per-output-row scales differing 300x, as in trained layers) and the same inputs, with one
input column a hundred times the others (the kind of activation outlier trained decoders have).

- `fp32`: `F.linear` with the fp32 weights (the reference);
- `recfm int8`: `quantization.Int8Linear` (int8 weights, fp32 activations; recfm's kernel up to 32
  rows, a dequantized product above);
- `torch dynamic int8`: `torch.ao.nn.quantized.dynamic.Linear` with per-channel weights (fbgemm /
  oneDNN: activations rounded to int8 with one scale per call), what `--quantization int8` used before;
- `torch int8 weight-only`: `torch._weight_int8pack_mm` (the CPU op behind torchao's int8
  weight-only layout in eager mode), fp32 activations;
- `bitsandbytes int8`: `bitsandbytes.nn.Linear8bitLt` (LLM.int8: row-wise int8 activations, outlier
  columns above the threshold in 16 bits), when bitsandbytes is installed.

    python benchmarks/int8_kernels.py

Writes benchmarks/results/int8_kernels.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, markdown_table, write  # noqa: E402

# (in, out) of the small preset's decoder products (hidden 384, MLP 1,536; q/k/v fused, gate/up fused)
# and an atomic-id output head of 6,290 rows
SHAPES = [(384, 1152), (384, 3072), (1536, 384), (384, 6290)]


def paths(lin: torch.nn.Linear) -> dict:
    from torch import nn

    from recfm.serving.quantization import Int8Linear

    out = {"fp32": lambda x: F.linear(x, lin.weight, lin.bias)}
    q = Int8Linear(lin)
    out["recfm int8"] = q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
        src = nn.Linear(lin.in_features, lin.out_features)
        src.load_state_dict(lin.state_dict())
        src.qconfig = per_channel_dynamic_qconfig
        out["torch dynamic int8"] = DynamicLinear.from_float(src)
    qw, scale = q.qweight, q.scale
    out["torch int8 weight-only"] = lambda x: torch._weight_int8pack_mm(x, qw, scale) + lin.bias
    try:
        import bitsandbytes as bnb

        b = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False, threshold=6.0)
        b.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        b.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        b = b.cpu()
        out["bitsandbytes int8"] = b
    except Exception as e:  # not installed, or no CPU path in this version
        print(f"bitsandbytes int8 skipped: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def timed(fn, x, reps: int) -> float:
    for _ in range(5):
        fn(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--name", default="int8_kernels")
    args = ap.parse_args()
    torch.manual_seed(0)
    results, rows = [], []
    with torch.inference_mode():
        for k, n in SHAPES:
            lin = torch.nn.Linear(k, n)
            lin.weight.data *= torch.logspace(-1, 1.5, n)[:, None] / 10  # row scales 300x apart
            impls = paths(lin)
            for m in args.rows:
                x = torch.randn(m, k)
                x[:, 7] *= 100  # an outlier column
                ref = impls["fp32"](x)
                base = None
                for name, fn in impls.items():
                    try:
                        y = fn(x)
                        err = float((y.float() - ref).norm() / ref.norm())
                        t = timed(fn, x, args.reps if m <= 64 else max(20, args.reps // 5))
                    except Exception as e:  # a path that cannot run this shape here
                        print(f"{name} {m}x{k}x{n}: {type(e).__name__}: {e}", file=sys.stderr)
                        continue
                    base = t if name == "fp32" else base
                    results.append({"rows": m, "in": k, "out": n, "path": name, "us": t * 1e6, "vs_fp32": t / base,
                                    "rel_error": err})
                    rows.append([f"{m} x {k} x {n}", name, t * 1e6, t / base, f"{err:.1e}"])
    m = machine()
    md = [f"# int8 linear layers ({time.strftime('%Y-%m-%d')})", "",
          f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} ({m['torch_cpu_capability']}), "
          f"{m['torch_threads']} threads. Random weights (output-row scales 300x apart, seed 0), inputs with one column "
          f"100x the others; median of {args.reps} products (a fifth of that above 64 rows) after 5 warm-up calls. "
          "time: microseconds per product; vs fp32: its ratio to fp32 F.linear on the same shape; error: "
          "||y - y_fp32|| / ||y_fp32||.", "",
          markdown_table(["rows x in x out", "path", "time (us)", "vs fp32", "error"], rows)]
    write(args.name, "\n".join(md), {"machine": m, "settings": vars(args), "results": results})
    print("\n".join(md))


if __name__ == "__main__":
    main()
