"""Paged attention, registered with transformers' attention interface as "recfm_paged".

`paged_attention` gets the query/key/value of one flattened batch, from the engine's decoder pass
(`decoder.py`) or, through `paged_attention_forward`, from the decoder's own attention modules:
every scheduled token of every sequence in a single row (batch size 1), positions given per token. The function writes the new keys and values into the
paged cache at their slots, then attends:

- decode tokens (one per sequence) together: by the native kernel (`native.py`), which reads each
  sequence's keys and values in place through its block table, or, where that cannot be built or
  the cache is not fp32, in one SDPA call over each sequence's gathered blocks (padded to the
  longest context, the padding masked out);
- each prefill chunk on its own: a chunk with no earlier context attends causally among its own
  tokens (the same computation as a whole-prompt forward pass); a later chunk gathers the context
  already in the cache and attends with a causal mask offset by the context length.

Without `paged` metadata in the call it falls back to SDPA (see `register` for the one caveat).
"""

from __future__ import annotations

from collections.abc import Callable
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
    blocks: torch.Tensor | None  # the sequence's blocks up to the chunk's end, or None when the chunk has no earlier context
    length: int = 0  # context length including the chunk
    mask: torch.Tensor | None = None  # (chunk, length) bool, True = attend


@dataclass
class PagedMetadata:
    k_cache: list[torch.Tensor]  # per layer (num_blocks, block_size, kv_heads, head_dim)
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor  # (N,) where each token's key/value goes (block * block_size + offset)
    decode_rows: torch.Tensor | slice | None = None  # (nd,) rows of the decode tokens, or a slice of the batch's rows
    decode_blocks: torch.Tensor | None = None  # (nd, max_blocks) block table per decode sequence (padded with 0)
    decode_mask: torch.Tensor | None = None  # (nd, 1, 1, max_blocks * block_size) bool (SDPA path)
    decode_lengths: torch.Tensor | None = None  # (nd,) context length of each decode sequence, new token included
    native: Callable | None = None  # native.paged_decode(): decode attention read in place from the cache
    prefills: list[PrefillChunk] = field(default_factory=list)
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # reused buffers for gathered keys and values


def gather(cache: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(..., n_blocks) block numbers -> (..., n_blocks * block_size, kv_heads, head_dim): whole blocks
    copied at once (a block is one contiguous run of memory), not token by token. `out`, a flat
    buffer reused from step to step, saves the page faults of a fresh multi-MB allocation per layer."""
    nb, bs, h, d = cache.shape
    idx = blocks.reshape(-1)
    if out is not None and out.numel() >= idx.numel() * bs * h * d:
        res = torch.index_select(cache.view(nb, bs * h * d), 0, idx, out=out[: idx.numel() * bs * h * d].view(-1, bs * h * d))
    else:
        res = cache.view(nb, bs * h * d).index_select(0, idx)
    return res.view(*blocks.shape[:-1], blocks.shape[-1] * bs, h, d)


def paged_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: (1, heads, N, head_dim) in, (1, N, heads, head_dim) out."""
    meta: PagedMetadata | None = kwargs.get("paged")
    if meta is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = paged_attention(module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                          meta, scaling)
    return out.unsqueeze(0), None


def paged_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PagedMetadata,
                    scaling: float | None) -> torch.Tensor:
    """q (N, heads, head_dim), k and v (N, kv_heads, head_dim) of one flattened batch -> (N, heads, head_dim).
    Writes k and v into the layer's cache at the batch's slots first."""
    kc, vc = meta.k_cache[layer], meta.v_cache[layer]
    kc.view(-1, *kc.shape[2:]).index_copy_(0, meta.slot_mapping, k.to(kc.dtype))
    vc.view(-1, *vc.shape[2:]).index_copy_(0, meta.slot_mapping, v.to(vc.dtype))
    gqa = q.shape[1] != k.shape[1]
    out = q.new_empty(q.shape)
    if meta.decode_rows is not None and meta.native is not None:
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        out[meta.decode_rows] = meta.native(q[meta.decode_rows], kc, vc, meta.decode_blocks, meta.decode_lengths, scale)
    elif meta.decode_rows is not None:
        qd = q[meta.decode_rows].unsqueeze(2)  # (nd, H, 1, d)
        sk, sv = meta.scratch or (None, None)
        kd = gather(kc, meta.decode_blocks, sk).transpose(1, 2).to(q.dtype)  # (nd, kvh, L, d)
        vd = gather(vc, meta.decode_blocks, sv).transpose(1, 2).to(q.dtype)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scaling, enable_gqa=gqa)
        out[meta.decode_rows] = o.squeeze(2)
    for c in meta.prefills:
        qp = q[c.start : c.end].transpose(0, 1).unsqueeze(0)  # (1, H, c, d)
        if c.blocks is None:
            kp = k[c.start : c.end].transpose(0, 1).unsqueeze(0)
            vp = v[c.start : c.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            kp = gather(kc, c.blocks)[: c.length].transpose(0, 1).unsqueeze(0).to(q.dtype)
            vp = gather(vc, c.blocks)[: c.length].transpose(0, 1).unsqueeze(0).to(q.dtype)
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=c.mask, scale=scaling, enable_gqa=gqa)
        out[c.start : c.end] = o[0].transpose(0, 1)
    return out


def register() -> str:
    """Register the function (idempotent). No mask function is registered with it: transformers then
    builds no 4D mask at all, which is what the paged path wants (the metadata says who attends to
    what). A plain call on such a model is unmasked causal SDPA: right for one unpadded sequence,
    not for a padded batch, so an engine's model is the engine's."""
    AttentionInterface.register(NAME, paged_attention_forward)
    return NAME
