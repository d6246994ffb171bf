"""Vision tower and projector builders, chosen by config strings (as in LLaVA).

The tower is a CLIP or SigLIP vision encoder from transformers, built from `vision_config` (or loaded
from a local checkpoint by `load_vision_weights`). The projector turns its patch features into
`image_tokens` vectors of the language model's width:

- `mlp`: average-pool the patch grid down to `image_tokens` vectors, then a 2-layer MLP;
- `resampler`: `image_tokens` learned queries cross-attend to the patches (a one-layer Perceiver
  resampler, as in Flamingo), then an MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel


def build_vision_tower(vision_config) -> nn.Module:
    return AutoModel.from_config(vision_config)


def vision_features(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) normalised pixels -> (N, P, d_vision) patch features (CLIP's class token dropped)."""
    out = tower(pixel_values=pixel_values).last_hidden_state
    if getattr(tower.config, "model_type", "") == "clip_vision_model":
        out = out[:, 1:]
    return out


class MLPProjector(nn.Module):
    def __init__(self, d_vision: int, d_model: int, n_tokens: int):
        super().__init__()
        self.n_tokens = n_tokens
        self.fc1 = nn.Linear(d_vision, d_model)
        self.fc2 = nn.Linear(d_model, d_model)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (N, P, dv) -> (N, n, d)
        pooled = F.adaptive_avg_pool1d(patches.transpose(1, 2), self.n_tokens).transpose(1, 2)
        return self.fc2(F.gelu(self.fc1(pooled)))


class Resampler(nn.Module):
    def __init__(self, d_vision: int, d_model: int, n_tokens: int, n_heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_tokens, d_model) * 0.02)
        self.kv_norm = nn.LayerNorm(d_vision)
        self.q_norm = nn.LayerNorm(d_model)
        heads = n_heads if d_model % n_heads == 0 else 1
        self.attn = nn.MultiheadAttention(d_model, heads, kdim=d_vision, vdim=d_vision, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        kv = self.kv_norm(patches)
        q = self.q_norm(self.queries).unsqueeze(0).expand(len(patches), -1, -1)
        x = q + self.attn(q, kv, kv, need_weights=False)[0]
        return x + self.mlp(x)


def build_projector(kind: str, d_vision: int, d_model: int, n_tokens: int) -> nn.Module:
    if kind == "mlp":
        return MLPProjector(d_vision, d_model, n_tokens)
    if kind == "resampler":
        return Resampler(d_vision, d_model, n_tokens)
    raise ValueError(f"unknown projector {kind!r}")


class GatedCrossAttention(nn.Module):
    """Flamingo-style gated cross-attention, item-level: each text token attends only to the image
    features of its own item (or to none, and is then left untouched). Gates start at zero, so at
    initialisation the language model computes exactly what it computed without this block."""

    def __init__(self, d_model: int, n_heads: int, eps: float = 1e-5):
        super().__init__()
        self.n_heads = n_heads if d_model % n_heads == 0 else 1
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.ff_norm = nn.RMSNorm(d_model, eps=eps)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model, bias=False), nn.GELU(), nn.Linear(2 * d_model, d_model, bias=False))
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, image_feats: torch.Tensor, token_image: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, d); image_feats (N_img, n, d); token_image (B, T): image index or -1."""
        sel = token_image >= 0
        if not bool(sel.any()):
            return hidden
        h = hidden[sel]  # (M, d): only tokens that belong to an item with an image
        feats = image_feats[token_image[sel]]  # (M, n, d)
        m, n, d = feats.shape
        hd = d // self.n_heads
        q = self.q(self.norm(h)).view(m, self.n_heads, 1, hd)
        k, v = self.kv(feats).view(m, n, 2, self.n_heads, hd).permute(2, 0, 3, 1, 4)  # (M, H, n, hd) each
        att = F.scaled_dot_product_attention(q, k, v).reshape(m, d)
        h = h + torch.tanh(self.attn_gate) * self.o(att)
        h = h + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(h))
        out = hidden.clone()
        out[sel] = h.to(hidden.dtype)
        return out
