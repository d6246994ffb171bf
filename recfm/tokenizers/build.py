"""`recfm tokenize`: train and save every tokenizer of a domain into one folder.

    OUT/
      tokenizers.json   versions, sizes, timings, VQ quality on held-out images
      item_index.json   item id <-> index, from the training split only (data.splits.ItemIndex)
      text/             byte-level BPE (PreTrainedTokenizerFast) with recfm's special tokens
      items/atomic/  items/semantic/  items/content/   the three item identifier modes
      vq/               the VQ image tokenizer;  image_codes.json: item id -> its image's codes

Only training-split text (item text, training reviews, the templates) trains the BPE, and the item
index and the content embeddings that semantic ids are clustered from depend on the catalogue and
the training split alone.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

VERSION = 1
TEXT_FEATURES = 512
THUMB = 8


def content_embeddings(titles: list[str], texts: list[str], images: list[Image.Image | None], dim: int = 64,
                       seed: int = 0) -> np.ndarray:
    """A content vector per item, from its words (hashed bag of words) and its picture (an 8x8 RGB
    thumbnail), each standardised, concatenated and reduced by SVD to `dim`. Cheap and
    deterministic; enough for residual k-means to give similar items shared code prefixes."""
    n = len(titles)
    words = np.zeros((n, TEXT_FEATURES), dtype=np.float32)
    for i, (a, b) in enumerate(zip(titles, texts)):
        for w in f"{a or ''} {b or ''}".lower().replace(".", " ").replace(",", " ").split():
            words[i, zlib.crc32(w.encode()) % TEXT_FEATURES] += 1.0
    words = np.log1p(words)
    pix = np.zeros((n, THUMB * THUMB * 3), dtype=np.float32)
    for i, im in enumerate(images):
        if im is not None:
            pix[i] = np.asarray(im.convert("RGB").resize((THUMB, THUMB), Image.BILINEAR), dtype=np.float32).ravel() / 255.0
    feats = []
    for f in (words, pix):
        f = f - f.mean(0, keepdims=True)
        scale = np.linalg.norm(f, axis=1).mean() or 1.0
        feats.append(f / scale)
    x = np.concatenate(feats, axis=1)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    k = min(dim, len(s))
    out = u[:, :k] * s[:k]
    sign = np.sign(out[np.abs(out).argmax(0), range(k)])  # fix SVD's sign ambiguity
    return (out * sign).astype(np.float32)


def tokenize_domain(domain_dir: str | Path, out: str | Path, *, vocab_size: int = 4096, semantic_levels: int = 3,
                    vq_steps: int = 1500, vq_image_size: int | None = None, vq_codebook: int = 512,
                    vq_channels: int = 64, vq_batch_size: int = 64, seed: int = 0,
                    progress: bool = True) -> dict:
    """Train and save every tokenizer for a domain; returns the summary written to tokenizers.json."""
    from ..data import ItemIndex, load_domain, leave_one_out
    from ..instructions.templates import load_templates
    from .items import build_item_tokenizer
    from .text import train_text_tokenizer
    from .vq import VQConfig, evaluate_vq, train_vq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    domain = load_domain(domain_dir)
    summary: dict = {"version": VERSION, "domain": domain.name, "seed": seed, "timings_s": {}}
    t0 = time.perf_counter()
    split = leave_one_out(domain)
    index = ItemIndex.from_training(split.train, domain.item_ids)
    index.save(out / "item_index.json")
    rows = {r["item_id"]: r for r in domain.items}
    ordered = [rows[i] for i in index.item_ids]

    # text: item text, training reviews and summaries, the templates
    def corpus():
        for r in ordered:
            yield f"{r['title'] or ''}. {r['text'] or ''}"
        for seq in split.train.select_columns(["reviews", "summaries"]):
            for x in seq["reviews"] + seq["summaries"]:
                if x:
                    yield x
        for ts in load_templates().values():
            for t in ts:
                yield t.prompt
        for k in range(1, 6):
            yield f"rated {k} yes no A B"

    tok = train_text_tokenizer(corpus(), vocab_size=vocab_size, show_progress=progress)
    tok.save_pretrained(out / "text")
    summary["text"] = {"vocab_size": len(tok)}
    summary["timings_s"]["text"] = round(time.perf_counter() - t0, 2)

    # items
    t0 = time.perf_counter()
    images = []
    for r in tqdm(ordered, desc="item images", disable=not progress):
        images.append(Image.open(domain.path / r["image_path"]).convert("RGB") if r["image_path"] else None)
    emb = content_embeddings([r["title"] for r in ordered], [r["text"] for r in ordered], images, seed=seed)
    summary["items"] = {}
    for mode in ("atomic", "semantic", "content"):
        it = build_item_tokenizer(index.item_ids, mode, embeddings=emb if mode == "semantic" else None,
                                  **({"levels": semantic_levels, "seed": seed} if mode == "semantic" else {}))
        it.save_pretrained(out / "items" / mode)
        info = {"new_tokens": len(it.new_tokens())}
        if mode == "semantic":
            info["usage"] = it.usage()
        summary["items"][mode] = info
    summary["timings_s"]["items"] = round(time.perf_counter() - t0, 2)

    # images: VQ on training-catalogue images, PSNR on a held-out tenth
    with_image = [(iid, im) for iid, im in zip(index.item_ids, images) if im is not None]
    if with_image:
        t0 = time.perf_counter()
        size = vq_image_size or (32 if max(with_image[0][1].size) <= 48 else 64)
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(with_image))
        n_held = max(1, len(with_image) // 10) if len(with_image) >= 20 else 0
        held, fit = perm[:n_held], perm[n_held:]
        cfg = VQConfig(image_size=size, codebook_size=vq_codebook, channels=vq_channels)
        vq, history = train_vq([with_image[i][1] for i in fit], cfg, steps=vq_steps, batch_size=vq_batch_size, seed=seed,
                               progress=progress)
        vq.save_pretrained(out / "vq")
        quality = evaluate_vq(vq, [with_image[i][1] for i in (held if n_held else fit)])
        codes = {}
        for start in tqdm(range(0, len(with_image), 256), desc="image codes", disable=not progress):
            batch = with_image[start : start + 256]
            enc = vq.encode([im for _, im in batch])
            codes.update({iid: c.tolist() for (iid, _), c in zip(batch, enc)})
        (out / "image_codes.json").write_text(json.dumps(codes) + "\n")
        summary["vq"] = {"image_size": size, "codebook_size": vq_codebook, "grid": cfg.grid, "steps": vq_steps,
                         "channels": vq_channels, "batch_size": vq_batch_size,
                         "held_out_images": int(n_held), "final_train_mse": history["mse"][-1],
                         **{k: float(v) for k, v in quality.items()}}
        summary["timings_s"]["vq"] = round(time.perf_counter() - t0, 2)
    (out / "tokenizers.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary

