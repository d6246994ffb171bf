"""Quality and training cost of the VQ image tokenizer.

For each image set, a seeded shuffle holds out `--test` images; the tokenizer is trained on the rest
with `train_vq` and scored on the held-out images: PSNR of the round trip (image -> grid x grid codes
-> image), the fraction of the codebook those images use, and the perplexity of their codes (the
effective number of codes in use). For scale, the table also gives the PSNR of the "grid mean": each
grid cell filled with its mean colour, i.e. as many cells as there are codes, but each one exact and
continuous. Train time is wall clock on `--threads` torch threads (1 by default: on a CPU shared with
other jobs, two threads fighting for one free core ran ~6x slower than one).

    python benchmarks/vq_bench.py --synthetic 2000                         # procedural shapes
    python benchmarks/vq_bench.py --images /work/shared/data/movielens-1m-posters --steps 1500

Images are resized (squashed, not cropped) to `--image-size`. Prints a table and writes
benchmarks/results/vq_bench.md and .json (machine, settings, seed). Nothing derived from the images
is written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from recfm.data.synthetic import draw_random_images  # noqa: E402
from recfm.tokenizers.images import ImageError, load_image  # noqa: E402
from recfm.tokenizers.vq import VQConfig, evaluate_vq, psnr, train_vq  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def draw_shapes(n: int, size: int, seed: int) -> np.ndarray:
    """n pictures drawn like the default domain's items (uint8, (n, size, size, 3))."""
    return np.stack([np.asarray(im) for im in draw_random_images(n, size, seed)])


def load_folder(folder: Path, size: int, limit: int | None) -> tuple[np.ndarray, int]:
    """Every image file in `folder` (sorted by name), resized to size x size; and how many files
    could not be read (reported, not hidden)."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise SystemExit(f"no image files in {folder}")
    images, bad = [], 0
    for p in paths:
        try:
            images.append(np.asarray(load_image(p).resize((size, size), Image.BICUBIC)))
        except ImageError as e:
            print(f"skipped: {e}", file=sys.stderr)
            bad += 1
    return np.stack(images), bad


def image_sets(args) -> list[dict]:
    """The image sets to measure, each {"name", "images" (uint8 N,H,W,3), "unreadable"}.
    (A `--domain DIR` option would add the domain's item images here.)"""
    sets = []
    if args.synthetic:
        sets.append({"name": f"default-domain pictures (seed {args.seed})", "unreadable": 0,
                     "images": draw_shapes(args.synthetic, args.image_size, args.seed)})
    for folder in args.images:
        images, bad = load_folder(Path(folder), args.image_size, args.limit)
        sets.append({"name": Path(folder).name, "images": images, "unreadable": bad})
    if not sets:
        raise SystemExit("nothing to measure: give --synthetic N and/or --images DIR")
    return sets


def grid_mean_psnr(images: torch.Tensor, grid: int) -> float:
    cells = F.adaptive_avg_pool2d(images, grid)
    return psnr(F.interpolate(cells, size=images.shape[-2:], mode="nearest"), images)


def bench(image_set: dict, config: VQConfig, args) -> dict:
    images = image_set["images"]
    order = np.random.default_rng(args.seed).permutation(len(images))
    n_test = min(args.test, len(images) // 5)
    test, train = images[order[:n_test]], images[order[n_test:]]
    model, history = train_vq(train, config, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, bf16=args.bf16, progress=not args.quiet)
    held_out = evaluate_vq(model, test)
    on_train = evaluate_vq(model, train[:n_test])
    test_tensor = torch.from_numpy(test).permute(0, 3, 1, 2).float() / 255
    return {
        "images": image_set["name"], "train": len(train), "test": n_test,
        "unreadable": image_set["unreadable"], "train_time_s": history["train_time_s"],
        "s_per_step": history["train_time_s"] / args.steps, "psnr_test": held_out["psnr"],
        "psnr_train": on_train["psnr"], "psnr_grid_mean": grid_mean_psnr(test_tensor, config.grid),
        "codebook_usage": held_out["codebook_usage"], "perplexity": held_out["perplexity"],
    }


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    cpu = names[0] if names else platform.processor()
    return {
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


HEAD = ["images", "train / test", "train time (s)", "s/step", "held-out PSNR (dB)", "train PSNR (dB)",
        "grid-mean PSNR (dB)", "codebook usage", "perplexity"]


def row(r: dict, k: int) -> list[str]:
    return [r["images"], f"{r['train']:,} / {r['test']:,}", f"{r['train_time_s']:.0f}",
            f"{r['s_per_step']:.3f}", f"{r['psnr_test']:.2f}", f"{r['psnr_train']:.2f}",
            f"{r['psnr_grid_mean']:.2f}", f"{r['codebook_usage']:.1%}", f"{r['perplexity']:.0f} / {k}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", action="append", default=[], metavar="DIR", help="a folder of images")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="draw N procedural images")
    p.add_argument("--limit", type=int, default=None, help="use at most this many files per folder")
    p.add_argument("--test", type=int, default=500, help="held-out images (at most a fifth of a set)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--codebook-size", type=int, default=512)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--code-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (slower on CPUs without bf16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "vq_bench"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    config = VQConfig(image_size=args.image_size, channels=args.channels, codebook_size=args.codebook_size,
                      code_dim=args.code_dim, grid=args.grid)
    results = [bench(s, config, args) for s in image_sets(args)]

    title = (f"VQ tokenizer: {args.image_size}px -> {args.grid}x{args.grid} codes, K={args.codebook_size}, "
             f"{args.steps} steps x batch {args.batch_size}, {'bf16' if args.bf16 else 'fp32'}, "
             f"{args.threads} thread(s)")
    table = Table(*HEAD, title=title)
    for r in results:
        table.add_row(*row(r, args.codebook_size))
    Console(width=160).print(table)

    info, settings = machine(), {**vars(args), "config": vars(config)}
    md = [f"# VQ image tokenizer\n\n{title}. Held-out PSNR, codebook usage and perplexity are on the "
          "held-out images; train PSNR on as many training images. Grid-mean PSNR: each grid cell "
          "filled with its exact mean colour, for scale. Unreadable files: "
          f"{', '.join(str(r['unreadable']) for r in results)}.\n",
          "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    md += ["| " + " | ".join(row(r, args.codebook_size)) + " |" for r in results]
    md += ["", "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), "",
           "Settings: " + ", ".join(f"{k}={v}" for k, v in vars(args).items())]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "settings": settings, "results": results}, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
