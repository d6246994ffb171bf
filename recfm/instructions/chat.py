"""The one renderer: a conversation (messages with text, item and image parts) to token ids.

Training examples, evaluation prompts, `recfm chat` and the HTTP server all call `render`, so a
prompt means the same tokens everywhere. Layout:

    <s> <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|> [<|assistant|>]

An item part becomes, by its view:
    history  <|item|> [<image> x n] <identifier> title [" rated 4"] <|/item|>
    full     <|item|> [<image> x n] <identifier> title ". " text <|/item|>
             (with the model's item_layout "id_first": <identifier> before the images)
    id       <identifier>                       (an answer: the item to predict)
    image    <image> x n
    codes    <|img|> <img_k> ... <|/img|>       (an answer: the item's picture as VQ codes)
where <identifier> is the item tokenizer's code (atomic, semantic) or the `<item>` placeholder
(content mode; the position and item index are recorded so the model can fill the embedding).

The result records where every image's n placeholder tokens start and which image goes there, the
span of every item, and labels that are -100 everywhere but the assistant's answer. When a prompt is
over the token budget, history items are dropped oldest first; if it still does not fit, it is an
error (the server answers 400).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..tokenizers.text import ASSISTANT, BOS, END, IMAGE, IMG_END, IMG_START, ITEM_END, ITEM_START, SYSTEM, USER

IGNORE = -100
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class PromptTooLong(ValueError):
    pass


class CatalogueItem(Protocol):
    title: str | None
    text: str | None
    has_image: bool


@dataclass(frozen=True)
class Item:
    title: str | None = None
    text: str | None = None
    has_image: bool = False


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image_positions: list[int] = field(default_factory=list)  # start of each image's placeholder run
    image_refs: list[str] = field(default_factory=list)  # "item:<id>" or the caller's reference
    item_spans: list[tuple[int, int, str]] = field(default_factory=list)  # [start, end) and item id
    content_positions: list[tuple[int, int]] = field(default_factory=list)  # (position, item index)
    dropped_history: int = 0


@dataclass
class RenderContext:
    """Everything rendering needs besides the messages."""

    tokenizer: Any  # a Hugging Face tokenizer with recfm's special tokens
    item_tokenizer: Any  # a bound recfm.tokenizers.items.ItemTokenizer
    catalogue: Mapping[str, CatalogueItem]
    image_tokens: int = 1  # placeholder tokens per image (the projector's output length)
    image_codes: Mapping[str, Sequence[int]] | None = None  # item id -> VQ codes, for "codes" answers
    image_code_offset: int | None = None  # token id of <img_0>
    max_tokens: int = 1024
    max_text_chars: int = 200  # item text is cut to this many characters in "full" views
    id_first: bool = False  # the model's item layout: identifier before the image (RecFMConfig.item_layout)

    def __post_init__(self):
        t = self.tokenizer
        self.ids = {tok: t.convert_tokens_to_ids(tok) for tok in
                    (BOS, END, IMAGE, IMG_START, IMG_END, ITEM_START, ITEM_END, SYSTEM, USER, ASSISTANT)}
        self._cache: dict[tuple, tuple] = {}

    def text(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False)


def _item_tokens(ctx: RenderContext, item_id: str, view: str, rating) -> tuple[list[int], list[tuple[int, str]], list[tuple[int, int]]]:
    """(tokens, [(offset, image ref)], [(offset, content item index)]) for one item part, cached."""
    key = (item_id, view, rating)
    hit = ctx._cache.get(key)
    if hit is not None:
        return hit
    if item_id not in ctx.catalogue:
        raise KeyError(f"unknown item {item_id!r}")
    it = ctx.catalogue[item_id]
    ids = ctx.ids
    toks: list[int] = []
    images: list[tuple[int, str]] = []
    content: list[tuple[int, int]] = []

    def identifier():
        code = ctx.item_tokenizer.encode(item_id)
        if getattr(ctx.item_tokenizer, "mode", "") == "content":
            content.append((len(toks), ctx.item_tokenizer.index(item_id)))
        toks.extend(code)

    def image():
        images.append((len(toks), f"item:{item_id}"))
        toks.extend([ids[IMAGE]] * ctx.image_tokens)

    if view == "id":
        identifier()
    elif view == "image":
        if not it.has_image:
            raise ValueError(f"item {item_id!r} has no image")
        image()
    elif view == "codes":
        if ctx.image_codes is None or item_id not in ctx.image_codes or ctx.image_code_offset is None:
            raise ValueError(f"no image codes for item {item_id!r}")
        toks += [ids[IMG_START], *(ctx.image_code_offset + int(c) for c in ctx.image_codes[item_id]), ids[IMG_END]]
    elif view in ("history", "full"):
        toks.append(ids[ITEM_START])
        if ctx.id_first:  # the context loss then predicts the item from the items before it
            identifier()
        if it.has_image:
            image()
        if not ctx.id_first:  # ... or, here, also from its own picture
            identifier()
        words = " " + (it.title or "")
        if view == "full" and it.text:
            words += ". " + it.text[: ctx.max_text_chars]
        if view == "history" and rating is not None:
            words += f" rated {int(rating) if float(rating).is_integer() else rating}"
        toks += ctx.text(words)
        toks.append(ids[ITEM_END])
    else:
        raise ValueError(f"unknown item view {view!r}")
    out = (toks, images, content)
    ctx._cache[key] = out
    return out


def render(messages: Sequence[Mapping], ctx: RenderContext, add_generation_prompt: bool = False) -> Encoded:
    """Render a conversation. Assistant turns are labelled (trained on); everything else is -100."""
    # first, every part as a token chunk; history items can be dropped later
    chunks: list[dict] = [{"tokens": [ctx.ids[BOS]], "label": False}]
    for m in messages:
        role = m["role"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"unknown role {role!r}; use system, user or assistant")
        answer = role == "assistant"
        chunks.append({"tokens": [ctx.ids[ROLE_TOKENS[role]]], "label": False})
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for p in parts:
            kind = p.get("type")
            if kind == "text":
                chunks.append({"tokens": ctx.text(p["text"]), "label": answer})
            elif kind == "item":
                toks, images, content_pos = _item_tokens(ctx, str(p["item_id"]), p.get("view", "full"), p.get("rating"))
                chunks.append({"tokens": toks, "label": answer, "images": images, "content": content_pos,
                               "item": str(p["item_id"]), "history": bool(p.get("history"))})
            elif kind == "image":
                ref = str(p["image"])
                chunks.append({"tokens": [ctx.ids[IMAGE]] * ctx.image_tokens, "label": answer,
                               "images": [(0, ref)]})
            else:
                raise ValueError(f"unknown content part type {kind!r}; use text, item or image")
        chunks.append({"tokens": [ctx.ids[END]], "label": answer})
    if add_generation_prompt:
        chunks.append({"tokens": [ctx.ids[ASSISTANT]], "label": False})

    total = sum(len(c["tokens"]) for c in chunks)
    dropped = 0
    for c in chunks:  # oldest history items first
        if total <= ctx.max_tokens:
            break
        if c.get("history") and not c.get("dropped"):
            c["dropped"] = True
            total -= len(c["tokens"])
            dropped += 1
    if total > ctx.max_tokens:
        raise PromptTooLong(f"the prompt needs {total} tokens without any history, over the budget of {ctx.max_tokens}")

    enc = Encoded(input_ids=[], labels=[], dropped_history=dropped)
    for c in chunks:
        if c.get("dropped"):
            continue
        start = len(enc.input_ids)
        toks = c["tokens"]
        enc.input_ids += toks
        enc.labels += toks if c["label"] else [IGNORE] * len(toks)
        for off, ref in c.get("images", ()):
            enc.image_positions.append(start + off)
            enc.image_refs.append(ref)
        for off, idx in c.get("content", ()):
            enc.content_positions.append((start + off, idx))
        if "item" in c:
            enc.item_spans.append((start, start + len(toks), c["item"]))
    return enc


def id_sequence_prompt(item_ids: Sequence[str], ctx: RenderContext) -> Encoded:
    """A history in the identifier-only view of pretraining's `id_sequence` rows, left open after its
    last identifier: the model's next-token distribution there is its prediction of the next item
    (rank it with `score_items`). Over the token budget, the oldest items are dropped."""
    from .templates import item_part

    enc = render([{"role": "user", "content": [item_part(i, "id", history=True) for i in item_ids]}], ctx)
    enc.input_ids, enc.labels = enc.input_ids[:-1], enc.labels[:-1]  # no <|end|>: the sequence goes on
    return enc

