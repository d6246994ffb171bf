"""From example rows (conversations as JSON) to model batches, through the one renderer.

The collator renders each conversation with `recfm.instructions.chat.render`, right-pads ids and
labels, loads and normalises the images the prompts refer to (catalogue images are read once and
kept as uint8), and lists the content-mode item of every <item> placeholder in row-major order. With
`distill` > 0 it also renders each next-item row's history in the identifier-only view (its newest
`distill` items), as `teacher_*` tensors: the prompt's answer position learns that view's distribution.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from ..instructions.chat import IGNORE, Item, RenderContext, id_sequence_prompt, render
from ..tokenizers.words import WordVocabulary


def domain_catalogue(domain) -> dict[str, Item]:
    return {r["item_id"]: Item(r["title"], r["text"], r["image_path"] is not None)
            for r in domain.items.select_columns(["item_id", "title", "text", "image_path"])}


class ItemImages:
    """uint8 (3, S, S) pixels of catalogue items, read from the domain folder on first use."""

    def __init__(self, domain, size: int):
        self.domain, self.size = domain, size
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, item_id: str) -> torch.Tensor:
        x = self._cache.get(item_id)
        if x is None:
            path = self.domain.image_path(item_id)
            if path is None:
                raise ValueError(f"item {item_id!r} has no image")
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB").resize((self.size, self.size), Image.BICUBIC))
            x = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
            self._cache[item_id] = x
        return x


def render_context(tokenizers, domain, model_config, max_tokens: int = 1024) -> RenderContext:
    return RenderContext(tokenizer=tokenizers.text, item_tokenizer=tokenizers.items, catalogue=domain_catalogue(domain),
                         image_tokens=model_config.image_tokens if model_config.vision_config is not None else 0,
                         image_codes=tokenizers.image_codes, image_code_offset=tokenizers.image_code_offset,
                         max_tokens=max_tokens, id_first=model_config.item_layout == "id_first")


class Collator:
    """Callable for a DataLoader / Trainer: rows with a `messages` JSON column -> a batch dict."""

    def __init__(self, ctx: RenderContext, images: ItemImages | None, model_config, pad_to_multiple: int = 8,
                 distill: int = 0):
        self.ctx, self.images, self.cfg = ctx, images, model_config
        self.distill = distill
        self.pad_id = ctx.tokenizer.pad_token_id
        self.pad_to_multiple = pad_to_multiple
        self.mean = torch.tensor(model_config.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(model_config.image_std).view(1, 3, 1, 1)

    def encode(self, messages) -> object:
        return render(json.loads(messages) if isinstance(messages, str) else messages, self.ctx)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(r["messages"]) for r in rows]
        out = self.batch(encoded)
        if self.distill:
            out.update(self.teacher(rows))
        return out

    def teacher(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """The identifier-only view of each next-item row's history (`teacher_rows`: which rows), or {}."""
        picked = [(k, r["history"][-self.distill:]) for k, r in enumerate(rows)
                  if r.get("task") == "next_item" and r.get("history")]
        if not picked:
            return {}
        b = self.batch([id_sequence_prompt(h, self.ctx) for _, h in picked])
        out = {f"teacher_{k}": v for k, v in b.items() if k != "labels"}
        out["teacher_rows"] = torch.tensor([k for k, _ in picked], dtype=torch.long)
        return out

    def batch(self, encoded) -> dict[str, torch.Tensor]:
        length = max(len(e.input_ids) for e in encoded)
        length = -(-length // self.pad_to_multiple) * self.pad_to_multiple
        ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        refs, content = [], []
        for b, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[b, :n] = torch.tensor(e.input_ids)
            labels[b, :n] = torch.tensor(e.labels)
            mask[b, :n] = 1
            refs += e.image_refs
            content += [idx for _, idx in sorted(e.content_positions)]
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if refs and self.images is not None and self.cfg.vision_config is not None:
            pix = torch.stack([self.images(r.removeprefix("item:")) for r in refs])
            out["pixel_values"] = (pix.float() / 255.0 - self.mean) / self.std
        if content:
            out["content_item_ids"] = torch.tensor(content, dtype=torch.long)
        return out


def item_description(title: str | None, text: str | None) -> str:
    """What the item encoder reads: the title, then the text, the title once when the text repeats it
    (MovieLens' texts start with the title: read twice, it took half of the 16 tokens read then)."""
    title, text = (title or "").strip(), (text or "").strip()
    if title and text.startswith(title):
        return text
    return ". ".join(p for p in (title, text) if p)


def content_catalogue(model, tokenizers, domain, images: ItemImages | None) -> None:
    """Content mode: load every item's text ids and pixels into the model (index order)."""
    cfg = model.config
    n, length = cfg.n_items, cfg.item_text_len
    rows = {r["item_id"]: r for r in domain.items.select_columns(["item_id", "title", "text", "image_path"])}
    text_ids = torch.full((n, length), -1, dtype=torch.long)
    has_image = torch.zeros(n, dtype=torch.bool)
    size = cfg.vision_config.image_size if cfg.vision_config is not None else 1
    pixels = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    words = WordVocabulary(tuple(cfg.item_word_vocab), tuple(cfg.item_word_idf)) if cfg.item_text != "tokens" else None
    word_ids = torch.full((n, length), -1, dtype=torch.long) if words is not None else None
    word_weights = torch.zeros(n, length) if words is not None else None
    for k, iid in enumerate(tokenizers.items.item_ids):
        r = rows.get(iid)
        if r is None:
            continue
        description = item_description(r["title"], r["text"])
        ids = tokenizers.text.encode(description, add_special_tokens=False)[:length]
        text_ids[k, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if words is not None:
            wids, weights = words.encode(description, length)
            word_ids[k, : len(wids)] = torch.tensor(wids, dtype=torch.long)
            word_weights[k, : len(wids)] = torch.tensor(weights)
        if r["image_path"] and images is not None and cfg.vision_config is not None:
            pixels[k] = images(iid)
            has_image[k] = True
    model.model.set_catalogue(text_ids, pixels, has_image, word_ids, word_weights)


def training_words(tokenizers, domain, min_df: int) -> WordVocabulary:
    """Words mode, a new model: the vocabulary of the words `min_df` or more of the items seen in
    training share (an item held out of training, e.g. on the cold split, adds no word)."""
    texts = {r["item_id"]: item_description(r["title"], r["text"])
             for r in domain.items.select_columns(["item_id", "title", "text"])}
    seen = tokenizers.index.item_ids[: tokenizers.index.n_train_items]
    return WordVocabulary.from_texts((texts.get(i, "") for i in seen), min_df)
