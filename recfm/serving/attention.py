"""Paged attention, registered with transformers' attention interface as "recfm_paged".

The decoder's own attention modules project, apply rotary embeddings and call this function with the
query/key/value of one flattened batch: every scheduled token of every sequence in a single row
(batch size 1), positions given per token. The function writes the new keys and values into the
paged cache at their slots, then attends:

- decode tokens (one per sequence) together, in one SDPA call over each sequence's gathered blocks
  (padded to the longest context, the padding masked out);
- each prefill chunk on its own: a chunk with no earlier context attends causally among its own
  tokens (the same computation as a whole-prompt forward pass); a later chunk gathers the context
  already in the cache and attends with a causal mask offset by the context length.

Without `paged` metadata in the call it falls back to SDPA (see `register` for the one caveat).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "recfm_paged"


@dataclass
class PrefillChunk:
    start: int  # first row of the chunk in the flattened batch
    end: int
    context: torch.Tensor | None  # cache slots of the context before and including the chunk, or None when it is the first
    mask: torch.Tensor | None  # (chunk, context) bool, True = attend


@dataclass
class PagedMetadata:
    k_cache: list[torch.Tensor]  # per layer (num_slots, kv_heads, head_dim)
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor  # (N,) where each token's key/value goes
    decode_rows: torch.Tensor | None = None  # (nd,) rows of the decode tokens
    decode_slots: torch.Tensor | None = None  # (nd, L) context slots per decode sequence (padded with 0)
    decode_mask: torch.Tensor | None = None  # (nd, 1, 1, L) bool
    prefills: list[PrefillChunk] = field(default_factory=list)


def paged_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    meta: PagedMetadata | None = kwargs.get("paged")
    if meta is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = module.layer_idx
    kc, vc = meta.k_cache[layer], meta.v_cache[layer]
    k = key[0].transpose(0, 1)  # (N, kvh, d)
    v = value[0].transpose(0, 1)
    kc.index_copy_(0, meta.slot_mapping, k.to(kc.dtype))
    vc.index_copy_(0, meta.slot_mapping, v.to(vc.dtype))
    q = query[0]  # (H, N, d)
    gqa = q.shape[0] != k.shape[1]
    out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])  # (N, H, d)
    if meta.decode_rows is not None:
        qd = q[:, meta.decode_rows].transpose(0, 1).unsqueeze(2)  # (nd, H, 1, d)
        kd = kc[meta.decode_slots].transpose(1, 2).to(q.dtype)  # (nd, kvh, L, d)
        vd = vc[meta.decode_slots].transpose(1, 2).to(q.dtype)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scaling, enable_gqa=gqa)
        out[meta.decode_rows] = o.squeeze(2)
    for c in meta.prefills:
        qp = q[:, c.start : c.end].unsqueeze(0)  # (1, H, c, d)
        if c.context is None:
            kp = key[:, :, c.start : c.end]
            vp = value[:, :, c.start : c.end]
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            kp = kc[c.context].transpose(0, 1).unsqueeze(0).to(q.dtype)
            vp = vc[c.context].transpose(0, 1).unsqueeze(0).to(q.dtype)
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=c.mask, scale=scaling, enable_gqa=gqa)
        out[c.start : c.end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> str:
    """Register the function (idempotent). No mask function is registered with it: transformers then
    builds no 4D mask at all, which is what the paged path wants (the metadata says who attends to
    what). A plain call on such a model is unmasked causal SDPA: right for one unpadded sequence,
    not for a padded batch, so an engine's model is the engine's."""
    AttentionInterface.register(NAME, paged_attention_forward)
    return NAME
