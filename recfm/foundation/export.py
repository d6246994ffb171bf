"""Export the text path of a RecFM model as a plain Hugging Face causal LM checkpoint.

The decoder inside RecFM is a stock transformers model (Llama, Qwen2, Mistral...), so its weights
plus the output head are a complete `*ForCausalLM` that any Llama-family runtime serves (vLLM, TGI,
llama.cpp after conversion). What does not carry over: images (the vision tower, the projector,
cross-attention blocks) and content-mode item vectors; atomic and semantic item tokens do carry over
(they are ordinary vocabulary rows), so next-item answers from text-only prompts work in the export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def export_text_model(run_dir: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    from ..tokenizers.text import load_text_tokenizer
    from .modeling import RecFMForCausalLM

    run_dir, out = Path(run_dir), Path(out)
    model = RecFMForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
    tc = model.config.text_config
    lm = AutoModelForCausalLM.from_config(tc)
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight.data
    missing, unexpected = lm.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise ValueError(f"the decoder's weights do not fit {type(lm).__name__} (missing {missing[:5]}, unexpected {unexpected[:5]})")
    lm.config.tie_word_embeddings = False
    lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id = (
        model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id)
    if dtype is not None:
        lm.to(dtype)
    lm.save_pretrained(out)
    tok = load_text_tokenizer(run_dir)
    tok.save_pretrained(out)
    (out / "recfm_export.json").write_text(json.dumps({
        "source": str(run_dir.resolve()), "architecture": type(lm).__name__, "item_mode": model.config.item_mode,
        "dropped": ["vision tower", "projector", "cross-attention blocks", "content item encoder"],
    }, indent=2) + "\n")
    return out
