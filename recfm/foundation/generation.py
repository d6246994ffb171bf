"""Generation helpers: constrained decoding for items and for image code grids.

- `beam_items`: top-k items for prompts by beam search constrained to the item trie (how semantic
  ids are ranked; works for atomic ids too).
- `ImageGridProcessor` + `generate_images`: after <|img|>, exactly grid*grid image-code tokens, then
  <|/img|>; nothing else can come out, so every generation decodes to a picture.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..tokenizers.trie import TrieLogitsProcessor


@torch.no_grad()
def beam_items(model, item_tokenizer, input_ids: torch.Tensor, k: int = 10, attention_mask=None,
               pixel_values=None, end_token_id: int | None = None, **kwargs) -> list[list[str]]:
    """For each prompt (left-padded), the k items with the best constrained beams, best first."""
    end = end_token_id if end_token_id is not None else model.config.eos_token_id
    n_levels = item_tokenizer.id_table.shape[1]
    proc = TrieLogitsProcessor(item_tokenizer.trie, span_start=input_ids.shape[1], end_token_id=end)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         logits_processor=LogitsProcessorList([proc]), num_beams=k, num_return_sequences=k,
                         do_sample=False, max_new_tokens=n_levels + 1, early_stopping=True,
                         pad_token_id=model.config.pad_token_id, eos_token_id=end, **kwargs)
    codes = out[:, input_ids.shape[1]:].tolist()
    result = []
    for b in range(input_ids.shape[0]):
        items = []
        for seq in codes[b * k : (b + 1) * k]:
            item = item_tokenizer.decode([t for t in seq if t != end and t != model.config.pad_token_id][:n_levels])
            if item is not None and item not in items:
                items.append(item)
        result.append(items)
    return result


class ImageGridProcessor(LogitsProcessor):
    """Forces <|img|>, then exactly `n_codes` image-code tokens, then <|/img|>, from `span_start`."""

    def __init__(self, span_start: int, img_start_id: int, img_end_id: int, code_offset: int, n_codebook: int,
                 n_codes: int, eos_token_id: int):
        self.span_start, self.n_codes = span_start, n_codes
        self.img_start_id, self.img_end_id, self.eos = img_start_id, img_end_id, eos_token_id
        self.codes = slice(code_offset, code_offset + n_codebook)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.span_start
        mask = torch.full_like(scores, float("-inf"))
        if step == 0:
            mask[:, self.img_start_id] = 0
        elif step <= self.n_codes:
            mask[:, self.codes] = 0
        elif step == self.n_codes + 1:
            mask[:, self.img_end_id] = 0
        else:
            mask[:, self.eos] = 0
        return scores + mask


@torch.no_grad()
def generate_image_codes(model, input_ids: torch.Tensor, attention_mask=None, pixel_values=None,
                         do_sample: bool = True, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                         **kwargs) -> torch.Tensor:
    """(B, grid*grid) image codes generated after each prompt (prompts end with <|assistant|>)."""
    cfg = model.config
    if cfg.image_code_offset < 0 or not cfg.image_codebook_size:
        raise ValueError("this model has no image-code vocabulary (build it with image_codebook_size)")
    n = cfg.image_grid ** 2
    proc = ImageGridProcessor(input_ids.shape[1], cfg.img_start_id, cfg.img_end_id, cfg.image_code_offset,
                              cfg.image_codebook_size, n, cfg.eos_token_id)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         logits_processor=LogitsProcessorList([proc]), do_sample=do_sample, temperature=temperature,
                         top_k=top_k, max_new_tokens=n + 2, min_new_tokens=n + 2, pad_token_id=cfg.pad_token_id, **kwargs)
    return out[:, input_ids.shape[1] + 1 : input_ids.shape[1] + 1 + n] - cfg.image_code_offset


def generate_images(model, vq, input_ids: torch.Tensor, **kwargs):
    """PIL images drawn by the VQ decoder from generated codes."""
    codes = generate_image_codes(model, input_ids, **kwargs)
    return vq.decode_to_pil(codes)
