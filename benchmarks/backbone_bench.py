"""Training speed and memory of the backbone on CPU: forward + backward tokens/s and peak memory.

The batch is shaped like real training data: next-item conversations from the built-in default
domain (generated into a temporary folder), each with a history of 20 items that all have an image,
rendered by `recfm.instructions.chat.render` exactly as training renders them (2 image tokens per
image, 32 x 32 pixels). The model is the `small` preset with a vocabulary of about 5,000 tokens
(the domain's BPE, its item tokens and 512 image-code tokens; padded up to `--vocab` when smaller).

For each fusion mode (early, cross-attention) and precision (fp32; bf16 autocast), a fresh process
builds the model, runs `--warmup` untimed steps and `--steps` timed ones (forward, backward,
gradients dropped; no optimizer), and reports the median step time, tokens/s over real (unpadded)
tokens, and memory: the process's peak RSS, and how far the steps raised it above the RSS with the
model and batch loaded (activations, gradients, allocator slack). The vision tower is frozen (the
default), so after the first step its features come from the model's image cache, as in training
over a catalogue. Cross-attention gates are opened (set to 0.5) so its blocks do real work.

    python benchmarks/backbone_bench.py                   # defaults: batch 8, 2 warm-up + 5 timed steps
                                                          # (bf16: 1 + 3; it is slow on CPUs without bf16 units)
    python benchmarks/backbone_bench.py --threads 2 --steps 10

Prints a table and writes benchmarks/results/backbone_bench.md and .json (machine, settings). Speed
numbers compare configurations of the same run on the same machine; they are not portable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

FUSIONS = ("early", "cross_attention")
PRECISIONS = ("fp32", "bf16-autocast")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- data (parent process) --------------------------------------------------------------------------


def prepare(work: Path, args) -> dict:
    """Domain, tokenizers and one rendered batch, written under `work`; returns a summary."""
    import numpy as np
    from PIL import Image

    from recfm.data import leave_one_out
    from recfm.data.synthetic import SyntheticConfig, prepare_default
    from recfm.instructions import Item, RenderContext, build_training_examples, render
    from recfm.instructions.chat import IGNORE
    from recfm.tokenizers.build import tokenize_domain
    from recfm.tokenizers.bundle import Tokenizers

    t0 = time.perf_counter()
    domain = prepare_default(work / "domain", SyntheticConfig(seed=args.seed), progress=False)
    tokenize_domain(domain.path, work / "tokenizers", vocab_size=4096, vq_steps=20, vq_codebook=512,
                    seed=args.seed, progress=False)
    toks = Tokenizers(work / "tokenizers", "atomic")
    split = leave_one_out(domain)
    examples = build_training_examples(domain, split, tasks=["next_item"], per_user=1, max_history=args.history,
                                       seed=args.seed)
    catalogue = {r["item_id"]: Item(r["title"], r["text"], r["image_path"] is not None) for r in domain.items}
    ctx = RenderContext(tokenizer=toks.text, item_tokenizer=toks.items, catalogue=catalogue, image_tokens=args.image_tokens,
                        image_codes=toks.image_codes, image_code_offset=toks.image_code_offset, max_tokens=8192)
    encoded = []
    for row in examples:
        messages = json.loads(row["messages"])
        n_hist = sum(p["type"] == "item" and p.get("history", False) for m in messages for p in m["content"]
                     if isinstance(m["content"], list))
        enc = render(messages, ctx)
        if n_hist == args.history and len(enc.image_refs) == args.history:
            encoded.append(enc)
        if len(encoded) == args.batch:
            break
    if len(encoded) < args.batch:
        raise SystemExit(f"only {len(encoded)} examples with {args.history} history items with images")
    pad = toks.text.pad_token_id
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((args.batch, length), pad, dtype=torch.long)
    labels = torch.full((args.batch, length), IGNORE, dtype=torch.long)
    mask = torch.zeros((args.batch, length), dtype=torch.long)
    refs = []
    for b, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        refs += e.image_refs
    pixels = []
    for ref in refs:
        with Image.open(domain.image_path(ref.removeprefix("item:"))) as im:
            arr = np.asarray(im.convert("RGB").resize((args.image_size, args.image_size), Image.BICUBIC)).copy()
        pixels.append(torch.from_numpy(arr).permute(2, 0, 1))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixels": torch.stack(pixels)}
    torch.save(batch, work / "batch.pt")
    return {"tokenizer_vocab": len(toks.text), "n_items": len(toks.items), "batch": args.batch,
            "history_items": args.history, "images": len(refs), "padded_length": length,
            "real_tokens": int(mask.sum()), "tokens_per_row": [int(x) for x in mask.sum(1)],
            "answer_tokens": int((labels != IGNORE).sum()), "prepare_s": round(time.perf_counter() - t0, 1)}


# --- one configuration (child process) --------------------------------------------------------------


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from recfm.foundation.build import build_model
    from recfm.tokenizers.bundle import Tokenizers

    work = Path(args.work)
    toks = Tokenizers(work / "tokenizers", "atomic")
    batch = torch.load(work / "batch.pt")
    model = build_model("small", toks, fusion=args.fusion, image_size=args.image_size, image_tokens=args.image_tokens)
    if model.config.vocab_size < args.vocab:
        model.resize_token_embeddings(args.vocab, mean_resizing=False)
    with torch.no_grad():
        for blk in model.model.cross_attn.values():
            blk.attn_gate.fill_(0.5)
            blk.ff_gate.fill_(0.5)
    model.train()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    inputs["pixel_values"] = model.model.normalize_pixels(batch["pixels"])
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    real_tokens = int(batch["attention_mask"].sum())
    autocast = args.precision == "bf16-autocast"
    base_rss = rss_mib()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    warmup, steps = (args.bf16_warmup, args.bf16_steps) if autocast else (args.warmup, args.steps)
    times, loss = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"fusion": args.fusion, "precision": args.precision, "params": n_params, "trainable": n_trainable,
            "vocab": model.config.vocab_size, "cross_attention_blocks": len(model.model.cross_attn),
            "step_s_median": med, "step_s_min": min(times), "step_s_max": max(times), "steps": len(times),
            "tokens_per_s": real_tokens / med, "loss": loss,
            "peak_rss_mib": rss_mib(), "rss_before_steps_mib": base_rss, "peak_rss_delta_mib": rss_mib() - base_rss}


# --- report ---------------------------------------------------------------------------------------------


def machine(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": threads}


def write_report(rows: list[dict], data: dict, settings: dict, mach: dict, out: Path) -> str:
    base = {r["fusion"]: r for r in rows if r["precision"] == "fp32"}
    lines = [
        "# Backbone training speed (CPU)",
        "",
        f"`small` preset, vocabulary {rows[0]['vocab']:,} (the tokenizer's {data['tokenizer_vocab']:,}: BPE, "
        f"{data['n_items']} item tokens and the image codes, padded up to {settings['vocab']:,}), batch {data['batch']} next-item conversations with "
        f"{data['history_items']} history items each, every item with an image ({data['images']} images of "
        f"{settings['image_size']}x{settings['image_size']} px, {settings['image_tokens']} image tokens each), rendered "
        f"by the chat renderer: {data['real_tokens']:,} real tokens, padded length {data['padded_length']}. Forward + "
        f"backward (no optimizer step), median of {settings['steps']} timed steps after {settings['warmup']} warm-up "
        f"steps ({settings['bf16_steps']} after {settings['bf16_warmup']} for bf16), each configuration in a fresh "
        "process. Tokens/s counts real (unpadded) tokens. Frozen vision tower "
        "(features cached after the first step). Peak RSS delta: how far the steps raised the process's peak RSS "
        "above its RSS with model and batch loaded. Speed-ups are against fp32 of the same fusion mode in this run.",
        "",
        "| fusion | precision | params (M) | step (s) | tokens/s | vs fp32 | peak RSS (MiB) | peak RSS delta (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["tokens_per_s"] / base[r["fusion"]]["tokens_per_s"] if r["fusion"] in base else float("nan")
        lines.append(f"| {r['fusion']} | {r['precision']} | {r['params'] / 1e6:.1f} | {r['step_s_median']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {ratio:.2f}x | {r['peak_rss_mib']:,.0f} | {r['peak_rss_delta_mib']:,.0f} |")
    lines += ["", "Machine: " + ", ".join(f"{k}={v}" for k, v in mach.items()), "",
              "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backbone_bench.md").write_text(text)
    (out / "backbone_bench.json").write_text(json.dumps(
        {"machine": mach, "settings": settings, "data": data, "results": rows}, indent=2) + "\n")
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--image-tokens", type=int, default=2)
    p.add_argument("--vocab", type=int, default=5000, help="pad the vocabulary up to this size when smaller")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bf16-warmup", type=int, default=1, help="bf16 autocast is slow on CPUs without bf16 units")
    p.add_argument("--bf16-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared CPU, fewer threads fight)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fusions", default=",".join(FUSIONS))
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    # internal: one configuration in a child process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--fusion", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in ("batch", "history", "image_size", "image_tokens", "vocab", "warmup",
                                              "steps", "bf16_warmup", "bf16_steps", "threads", "seed")}
    settings["preset"] = "small"
    with tempfile.TemporaryDirectory(prefix="recfm-backbone-bench-") as tmp:
        work = Path(tmp)
        data = prepare(work, args)
        print(f"batch: {data['batch']} x <= {data['padded_length']} tokens ({data['real_tokens']} real), "
              f"{data['images']} images, tokenizer vocabulary {data['tokenizer_vocab']} (prepared in {data['prepare_s']} s)",
              flush=True)
        rows = []
        for fusion in args.fusions.split(","):
            for precision in args.precisions.split(","):
                cmd = [sys.executable, __file__, "--worker", "--work", str(work), "--fusion", fusion,
                       "--precision", precision] + [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()
                                                    if k != "preset"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not result:
                    raise SystemExit(f"{fusion}/{precision} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(result[-1].removeprefix("RESULT "))
                rows.append(r)
                print(f"{fusion:16s} {precision:14s} {r['step_s_median']:.2f} s/step  {r['tokens_per_s']:,.0f} tokens/s  "
                      f"peak RSS {r['peak_rss_mib']:,.0f} MiB (+{r['peak_rss_delta_mib']:,.0f})", flush=True)
    text = write_report(rows, data, settings, machine(args.threads), args.out)
    print()
    print(text)


if __name__ == "__main__":
    main()
