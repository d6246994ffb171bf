"""Builders: a RecFM model from a preset and the tokenizers, or around a local pretrained LM."""

from __future__ import annotations

from pathlib import Path

import torch

from .configuration import build_config
from .modeling import RecFMForCausalLM


def build_model(preset: str = "tiny", tokenizers=None, *, fusion: str = "early", vision: str | None = "clip",
                image_size: int | None = None, text_path: str | Path | None = None,
                vision_path: str | Path | None = None, dtype: torch.dtype | None = None, **overrides) -> RecFMForCausalLM:
    """A model sized by `preset` whose vocabulary and special ids come from `tokenizers`
    (recfm.tokenizers.bundle.Tokenizers). With `text_path`, the language model is that local
    checkpoint (its vocabulary extended by recfm's tokens); with `vision_path`, the vision tower too."""
    tok = tokenizers.text if tokenizers is not None else None
    items = tokenizers.items if tokenizers is not None else None
    if image_size is None:
        image_size = tokenizers.vq.config.image_size if tokenizers is not None and tokenizers.vq is not None else 32
    cfg = build_config(preset, tokenizer=tok, item_tokenizer=items, vision=vision, image_size=image_size,
                       fusion=fusion, image_codebook_size=tokenizers.codebook_size if tokenizers is not None else 0,
                       image_grid=tokenizers.vq.config.grid if tokenizers is not None and tokenizers.vq is not None else 8,
                       text_path=str(text_path) if text_path else None,
                       vision_path=str(vision_path) if vision_path else None, **overrides)
    model = RecFMForCausalLM(cfg)
    if text_path:
        load_language_model(model, text_path)
    if vision_path:
        load_vision_tower(model, vision_path)
    if dtype is not None:
        model.to(dtype)
    return model


def load_language_model(model: RecFMForCausalLM, path: str | Path) -> None:
    """Copy a local Hugging Face causal LM's weights into the model. Rows for tokens recfm added
    beyond the checkpoint's vocabulary start at the mean of the existing embeddings."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    src = lm.state_dict()
    body = {k.removeprefix("model."): v for k, v in src.items() if k.startswith("model.")}
    emb_key = "embed_tokens.weight"
    target = model.model.language_model
    n_new = target.embed_tokens.weight.shape[0]
    for key, table in ((emb_key, body), ("lm_head.weight", src)):
        w = table.get(key, src.get("model.embed_tokens.weight"))  # tied checkpoints have no lm_head
        if w.shape[0] < n_new:
            w = torch.cat([w, w.mean(0, keepdim=True).expand(n_new - w.shape[0], -1)])
        table[key] = w
    missing, unexpected = target.load_state_dict(body, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the language model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    with torch.no_grad():
        model.lm_head.weight.copy_(src["lm_head.weight"])


def load_vision_tower(model: RecFMForCausalLM, path: str | Path) -> None:
    from transformers import AutoModel

    tower = AutoModel.from_pretrained(str(path), local_files_only=True)
    tower = getattr(tower, "vision_model", tower)
    sd = {k: v for k, v in tower.state_dict().items()}
    target = model.model.vision_tower
    inner = getattr(target, "vision_model", target)
    missing, unexpected = inner.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise ValueError(f"{path}: weights do not fit the vision tower (missing {missing[:5]}, unexpected {unexpected[:5]})")
