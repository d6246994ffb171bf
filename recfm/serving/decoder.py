"""The decoder's forward pass for the engine, as plain tensor code over the language model's own weights.

A serving step at 16-64 sequences is a few milliseconds of matrix work and, through transformers'
modules, as much again of Python: module dispatch, output-capturing and deprecation wrappers, a mask
builder that builds nothing, per-call shape checks. This pass runs the same computation as a Llama-
family decoder layer (RMSNorm, q/k/v projections, rotary embedding, attention, o projection, SwiGLU
MLP, residuals; the norms are the model's own modules) with changes that do not change the weights:

- q, k and v are one matrix product, and so are gate and up: their weights are concatenated once,
  and the modules' own weights become views into the concatenation (no second copy; transformers'
  forward, used by `generate`, `score_items` and the beam search, reads the same memory);
- bf16 weights on the CPU are multiplied from a copy that oneDNN packed once (`_linear`; F.linear
  repacks the weight on every call): 1.6x the tokens/s of one sequence and 1.3x at 16 on the 2-core
  EPYC, identical outputs, at the cost of a second copy of the decoder's weights;
- attention is `attention.paged_attention` called directly on (tokens, heads, head_dim) tensors;
- in bf16 on the CPU, RMSNorm (with the residual add before it) and the rotary embedding are one
  pass each through `csrc/norm_rope.cpp` (transformers' arithmetic and roundings, see there) instead
  of the modules' six to eight tensor operations each;
- the output head, when it is a plain linear layer, is applied in slices of 1,024 vocabulary rows:
  MKL ran the whole 6,290 x 384 head at 16-64 rows 1.5-1.7x slower than the same work in slices on
  the 2-core AVX2 machine the benchmarks use (each output is the same dot product either way).

- a flattened batch of more than 64 tokens (a step with prefill chunks) runs padded to a multiple of
  32 rows; attention and the cache see only the real ones. A matrix product of a shape the process
  has not run yet costs ~1.2-1.7 ms to set up in oneDNN (bf16) against ~0.2-0.3 ms to run, for each
  of a layer's four products, so prompts of every length made every prefill step ~30 ms slower; with
  the buckets there are 14 such shapes up to 512 tokens, and `warm()` sets them (and every decode
  batch up to 64) up before the first request.

Quantized projections are fused too: int8 and 4-bit q/k/v and gate/up run as one call of recfm's
int8 or 4-bit kernel over their concatenated rows (`quantization.fused_int8`, `fused_4bit`); anything
else that is not a plain `nn.Linear` is called as a module. A decoder this pass does not know (extra
norms inside attention, a different activation, sliding windows) is reported by `unsupported`, and
the runner goes through the modules instead.
The gated cross-attention blocks of cross-attention fusion run before their layer, as their forward
pre-hook does in a full forward pass.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import attention

KNOWN = ("LlamaModel", "MistralModel", "Qwen2Model")


def unsupported(lm) -> str | None:
    """Why this language model cannot run through the fast pass (None: it can)."""
    name = type(lm).__name__
    if name not in KNOWN:
        return f"{name} is not one of {KNOWN}"
    cfg = lm.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    if getattr(cfg, "use_sliding_window", False) or (name == "MistralModel" and getattr(cfg, "sliding_window", None)):
        return "sliding-window attention"
    for layer in lm.layers[: cfg.num_hidden_layers]:
        a, m = layer.self_attn, layer.mlp
        if any(hasattr(a, n) for n in ("q_norm", "k_norm")):
            return "norms inside attention"
        if not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
                not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return f"{type(layer).__name__} has other projections"
    return None


def _plain(*mods) -> bool:
    return all(type(m) is nn.Linear for m in mods)


def _fuse(*mods: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the modules' weights (and biases) and point each module at its slice of them."""
    weight = torch.cat([m.weight.detach() for m in mods])
    bias = torch.cat([m.bias.detach() for m in mods]) if mods[0].bias is not None else None
    lo = 0
    for m in mods:
        hi = lo + m.out_features
        m.weight = nn.Parameter(weight[lo:hi], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[lo:hi], requires_grad=False)
        lo = hi
    return weight, bias


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> F.linear(h, weight, bias); for bf16 weights on a CPU with oneDNN, the same product from a copy
    of the weight oneDNN packed once, since F.linear repacks it on every call (bit-identical outputs;
    15-30 us less per product at 1-64 rows on the 2-core EPYC, equal at 512)."""
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            linear = torch.ops.mkldnn._linear_pointwise
            linear(weight.new_zeros(1, weight.shape[1]), packed, bias, "none", [], "")
            return lambda h: linear(h, packed, bias, "none", [], "")
        except (AttributeError, RuntimeError, NotImplementedError):  # a torch build without these ops
            pass
    return lambda h: F.linear(h, weight, bias)


def _single(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> mod(h), through `_linear` when it is a plain linear layer."""
    if _plain(mod):
        return _linear(mod.weight.detach(), None if mod.bias is None else mod.bias.detach())
    return mod


def _projection(mods: tuple[nn.Module, ...]) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """h -> one output per module: a single fused matrix product when they are plain linear layers."""
    if _plain(*mods):
        linear = _linear(*_fuse(*mods))
        sizes = [m.out_features for m in mods]
        return lambda h: linear(h).split(sizes, dim=-1)
    from .quantization import fused_4bit, fused_int8

    return fused_4bit(mods) or fused_int8(mods) or (lambda h: tuple(m(h) for m in mods))


@dataclass
class _Layer:
    index: int
    norm1: Callable
    qkv: Callable
    o: Callable
    norm2: Callable
    gate_up: Callable
    down: Callable
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


class FastDecoder:
    HEAD_SLICE = 1024
    EXACT_ROWS = 64  # batches up to this many tokens run as they are (decode steps)
    ROW_BUCKET = 32  # larger ones are padded to a multiple of this

    @classmethod
    def rows(cls, n: int) -> int:
        """The rows a batch of n tokens runs as."""
        return n if n <= cls.EXACT_ROWS else -(-n // cls.ROW_BUCKET) * cls.ROW_BUCKET

    def __init__(self, lm, cross_attn: nn.ModuleDict | None = None, head: nn.Module | None = None, fused=None):
        reason = unsupported(lm)
        if reason:
            raise ValueError(f"the fast decoder pass does not support this language model: {reason}")
        cfg = lm.config
        self.lm = lm
        self.cross_attn = cross_attn if cross_attn is not None and len(cross_attn) else None
        rope = sys.modules[type(lm.layers[0].self_attn).__module__]
        self.rotate_half = rope.rotate_half
        self.layers = []
        for i, layer in enumerate(lm.layers[: cfg.num_hidden_layers]):
            a, m = layer.self_attn, layer.mlp
            head_dim = a.head_dim
            self.layers.append(_Layer(
                i, layer.input_layernorm, _projection((a.q_proj, a.k_proj, a.v_proj)), _single(a.o_proj),
                layer.post_attention_layernorm, _projection((m.gate_proj, m.up_proj)), _single(m.down_proj),
                cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, a.scaling))
        self.norm = lm.norm
        self.fused = fused if fused is not None and self._fusable() else None
        self.head = head
        if head is not None and _plain(head) and head.out_features > self.HEAD_SLICE:
            weights = head.weight.detach().split(self.HEAD_SLICE)  # views: no copy
            biases = head.bias.detach().split(self.HEAD_SLICE) if head.bias is not None else [None] * len(weights)
            slices = [_linear(w, b) for w, b in zip(weights, biases)]
            self.head = lambda h: torch.cat([f(h) for f in slices], dim=-1)
        elif head is not None:
            self.head = _single(head)

    @torch.no_grad()
    def warm(self, max_tokens: int) -> None:
        """Run the first layer's products and the head once at every batch size a step can have (1-64
        tokens, then the padded sizes up to max_tokens), so no request pays for setting a shape up (the
        other layers' products have the same shapes)."""
        if not self.layers:
            return
        L = self.layers[0]
        token = torch.zeros(1, dtype=torch.long, device=next(self.lm.parameters()).device)
        e = self.lm.get_input_embeddings()(token)  # what a step's input looks like (dtype, width)
        sizes = sorted({self.rows(n) for n in range(1, max_tokens + 1)})
        h = e.new_zeros(sizes[-1], e.shape[-1])
        a = e.new_zeros(sizes[-1], L.heads * L.head_dim)
        for m in sizes:
            L.qkv(h[:m])
            L.o(a[:m])
            g, u = L.gate_up(h[:m])
            L.down(F.silu(g) * u)
            if self.head is not None:
                self.head(h[:m])

    def _fusable(self) -> bool:
        """The kernels' case: bf16 on the CPU, norms with a weight and transformers' variance_epsilon, and
        every projection a plain linear layer (quantized modules may hand back another dtype)."""
        norms = [self.norm] + [n for L in self.lm.layers[: len(self.layers)] for n in (L.input_layernorm, L.post_attention_layernorm)]
        plain = all(_plain(L.self_attn.q_proj, L.self_attn.k_proj, L.self_attn.v_proj, L.self_attn.o_proj, L.mlp.gate_proj,
                           L.mlp.up_proj, L.mlp.down_proj) for L in self.lm.layers[: len(self.layers)])
        return plain and all(getattr(n, "weight", None) is not None and n.weight.dtype == torch.bfloat16
                             and n.weight.device.type == "cpu" and isinstance(getattr(n, "variance_epsilon", None), float)
                             for n in norms)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, positions: torch.Tensor, meta: attention.PagedMetadata,
                 xattn: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (N, d) input vectors of one flattened batch, positions (N,); returns (N, d) final hidden states.
        Each layer's last residual add is left `pending` and done with the next norm (by the kernel, in
        place on x, when the kernels run)."""
        fused = self.fused if x.dtype == torch.bfloat16 else None
        n = x.shape[0]
        cos, sin = self.lm.rotary_emb(x[None], positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()  # (N, head_dim)
        crossing = self.cross_attn is not None and xattn is not None
        m = n if crossing else self.rows(n)  # padded rows: zeros through the norms and products, never attended
        padded = None  # attention's output with the padding rows (zeros) below it, one buffer for every layer
        if m > n:
            x = torch.cat([x, x.new_zeros(m - n, x.shape[1])])
            padded = x.new_zeros(m, self.layers[0].heads * self.layers[0].head_dim) if self.layers else None
        elif fused is not None:
            x = x.contiguous()
        pending = None  # the MLP output still to be added to x
        for L in self.layers:
            if crossing and str(L.index) in self.cross_attn:
                if pending is not None:
                    x, pending = x + pending, None
                x = self.cross_attn[str(L.index)](x[None], *xattn)[0].contiguous()
            x, h = self._add_norm(fused, x, pending, L.norm1)
            q, k, v = L.qkv(h)
            q = q[:n].view(n, L.heads, L.head_dim)
            k = k[:n].view(n, L.kv_heads, L.head_dim)
            v = v[:n].view(n, L.kv_heads, L.head_dim)
            if fused is not None:
                fused.rope_(q, k, cos, sin)  # in place
            else:
                c, s_ = cos[:, None, :], sin[:, None, :]  # broadcast over heads
                q = q * c + self.rotate_half(q) * s_
                k = k * c + self.rotate_half(k) * s_
            a = attention.paged_attention(L.index, q, k, v, meta, L.scaling).reshape(n, -1)
            if padded is not None:
                padded[:n] = a
                a = padded
            x, h = self._add_norm(fused, x, L.o(a), L.norm2)
            g, u = L.gate_up(h)
            pending = L.down(F.silu(g) * u)
        return self._add_norm(fused, x, pending, self.norm)[1][:n]

    @staticmethod
    def _add_norm(fused, x: torch.Tensor, delta: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)); with the kernels, one pass that updates x in place."""
        if fused is None:
            x = x if delta is None else x + delta
            return x, norm(x)
        if delta is None:
            return x, fused.rms_norm(x, norm.weight, norm.variance_epsilon)
        return x, fused.add_rms_norm_(x, delta.contiguous(), norm.weight, norm.variance_epsilon)
