"""Quantized weights for inference, applied when a run is loaded (one loader for every precision).

Options, each measured on this project's CPU benchmark (`benchmarks/quant_bench.py`):

- `none`: the checkpoint's fp32 weights.
- `bf16`: every weight in bfloat16 (the KV cache follows). Half the bytes; on CPUs without bf16
  units the matrix products are emulated, which helps one-at-a-time decoding (memory-bound) and
  hurts batches.
- `int8`: every linear layer of the decoder, the output head (which scores every item in atomic
  mode), the vision tower and the projector as int8 weights with one fp32 scale per output row and
  fp32 activations (`Int8Linear`, weight-only: no activation is rounded, so an answer does not depend
  on the batch it ran in), multiplied by recfm's native kernel straight from the int8 bytes for up to
  32 rows and as a dequantized product above that; the token embeddings as int8 rows with one fp32
  scale per row (`QuantizedEmbedding`). Each decoder layer's q/k/v, and its gate/up, are one product
  over their concatenated rows (`fused_int8`).
- `nf4`, `fp4`: the decoder's linear layers as bitsandbytes 4-bit weights (blocks of 64, their
  scales double-quantized by bitsandbytes and kept dequantized in fp32 beside them), multiplied by
  recfm's native kernel straight from the packed codes for up to 32 rows (decoding up to 32
  sequences) and dequantized per call by bitsandbytes above that; the token embeddings as 4-bit rows
  (two per byte, an fp16 scale and offset per group of 64); the first decoder layer's attention
  projections (`INT8_ATTENTION_LAYERS`: most of the 4-bit error came from them), the output head,
  vision tower and projector in int8 as above. The head stays at 8 bits because its rows are the
  item scores.

Norms, biases, the vision tower's patch and position embeddings, and the content-item head stay in
fp32 in every option. An option this machine cannot run (bitsandbytes missing) is an error when the
model is loaded, never later; where the native kernels cannot be built, the PyTorch paths stand in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

OPTIONS = ("none", "bf16", "int8", "nf4", "fp4")
# 4-bit options keep the attention projections of this many leading decoder layers at int8: layer 0's
# q/k/v/o at 8 bits cut the KL divergence of the next-item distribution from fp32's by 66 % on the
# quickstart model and 25 % on the MovieLens one (nf4, 200 users each, weight-only int8) for 0.3-0.4 %
# more bytes; layer 0's MLP at int8 as well (all@0) helped on MovieLens and not on the quickstart model,
# and every down_proj at int8 cost 1.4-1.8 % more bytes and was no closer than the shipped layout:
# benchmarks/results/quant_sensitivity.md
INT8_ATTENTION_LAYERS = 1


class QuantizationError(ValueError):
    pass


def check(option: str) -> None:
    """Raise now if `option` cannot run here."""
    if option not in OPTIONS:
        raise QuantizationError(f"unknown quantization {option!r}; choose one of {', '.join(OPTIONS)}")
    if option in ("nf4", "fp4"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise QuantizationError(f"{option} needs bitsandbytes (pip install 'bitsandbytes>=0.47', which runs on "
                                    "CPU too)") from None


class QuantizedEmbedding(nn.Module):
    """Token embeddings stored as int8 rows (one fp32 scale per row) or 4-bit rows (two values per
    byte, an fp16 scale and offset per group of `group` values); rows are dequantized when looked up,
    so only the looked-up rows ever exist in fp32."""

    def __init__(self, weight: torch.Tensor, bits: int = 8, group: int = 64):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantizedEmbedding stores 4 or 8 bits, not {bits}")
        w = weight.detach().float()
        self.num_embeddings, self.embedding_dim = w.shape
        self.bits = bits
        if bits == 8:
            scale = w.abs().amax(1).clamp(min=1e-12) / 127
            self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale)
            return
        if self.embedding_dim % 2:
            raise ValueError(f"4-bit embedding rows need an even width, not {self.embedding_dim}")
        self.group = group if self.embedding_dim % group == 0 else self.embedding_dim
        g = w.view(self.num_embeddings, -1, self.group)
        lo = g.amin(-1).half()
        scale = ((g.amax(-1) - lo.float()) / 15).clamp(min=1e-6).half()
        q = torch.round((g - lo.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
        q = q.view(self.num_embeddings, self.embedding_dim)
        self.register_buffer("qweight", q[:, 0::2] | (q[:, 1::2] << 4))
        self.register_buffer("scale", scale)
        self.register_buffer("offset", lo)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids]
        if self.bits == 8:
            return rows.float() * self.scale[ids].unsqueeze(-1)
        q = torch.stack((rows & 15, rows >> 4), -1).view(*ids.shape, -1, self.group).float()
        out = q * self.scale[ids].float().unsqueeze(-1) + self.offset[ids].float().unsqueeze(-1)
        return out.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"


def _linears(root: nn.Module | None) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, module) of every plain nn.Linear inside `root`."""
    out = []
    for parent in (root.modules() if root is not None else ()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                out.append((parent, name, child))
    return out


class Int8Linear(nn.Module):
    """A linear layer with int8 weights, one fp32 scale per output row (symmetric, round to nearest),
    and fp32 activations: weight-only int8, so the weights' rounding is the only error and an answer
    does not depend on what else is in the batch. Products with a few rows (one to `ROWS` decoding
    sequences) run in recfm's native kernel (`native.gemv_int8`, reading the int8 bytes); more rows
    (prefill, scoring), tensors on a GPU, and machines where the kernel cannot be built, multiply the
    int8 values as floats and scale the outputs: the same sum, in another order."""

    ROWS = 32  # the kernel ran 1-32 rows in 0.09-0.74x the time of the dequantized product (EPYC, 2 threads)

    def __init__(self, lin: nn.Linear):
        super().__init__()
        from . import native

        w = lin.weight.detach().float()
        scale = w.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().float().clone())
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.kernel = native.gemv_int8()

    def product(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) times the int8 matrix `qweight` with row scales `scale` (this layer's
        own, or several layers' concatenated: `fused_int8`), without the bias."""
        dtype = x.dtype
        x = x.float()
        rows = x.numel() // self.in_features
        if self.kernel is not None and rows <= self.ROWS and x.is_cpu:
            out = self.kernel(x.reshape(rows, self.in_features), qweight, scale).view(*x.shape[:-1], -1)
        else:
            out = torch.nn.functional.linear(x, qweight.float()) * scale
        return out.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x, self.qweight, self.scale)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _concatenated(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`tensors` end to end along dim 0 in one new tensor, and each of them as a view into it (so that
    layers fused by `fused_int8` / `fused_4bit` keep no second copy of their weights)."""
    whole = torch.cat(tensors)
    views, at = [], 0
    for t in tensors:
        views.append(whole[at:at + len(t)])
        at += len(t)
    return whole, views


def _to_int8(parent: nn.Module, name: str, lin: nn.Linear) -> None:
    setattr(parent, name, Int8Linear(lin))


def fused_int8(mods) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None:
    """One product for int8 layers that read the same input (q/k/v, gate/up), as the decoder pass
    fuses plain linear layers: their int8 rows and scales are concatenated once and each layer's own
    buffers become views into the concatenation (no second copy). Scales are per output row, so the
    concatenation is exactly the int8 matrix of the stacked weights and every output is the one the
    layer alone computes. None when the layers cannot be fused."""
    first = mods[0] if mods else None
    if len(mods) < 2 or not all(type(m) is Int8Linear for m in mods) or \
            any(m.in_features != first.in_features or m.bias is not None for m in mods):
        return None
    qweight, qviews = _concatenated([m.qweight for m in mods])
    scale, sviews = _concatenated([m.scale for m in mods])
    for m, q, sc in zip(mods, qviews, sviews):
        m.qweight, m.scale = q, sc
    sizes = [m.out_features for m in mods]
    return lambda h: first.product(h, qweight, scale).split(sizes, dim=-1)


class Linear4bit(nn.Module):
    """A bitsandbytes 4-bit linear layer whose products with a few rows (one to `ROWS` decoding
    sequences) run in recfm's native kernel (`native.gemv_4bit`, reading the packed codes, never the
    fp32 weights); bigger batches, and machines where the kernel cannot be built, go through
    bitsandbytes (dequantize, then a matrix product). Both compute code[nibble] * absmax with the same
    absmax (bitsandbytes' double-quantized block scales, dequantized once here and kept in fp32)."""

    ROWS = 32  # the kernel beat bitsandbytes' dequantize-then-multiply up to 32 rows and tied at 64 (Xeon, k x n 384-3072)

    def __init__(self, bnb_linear):
        super().__init__()
        import bitsandbytes.functional as F4

        self.inner = bnb_linear
        state = bnb_linear.weight.quant_state
        absmax = F4.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
        self.register_buffer("absmax", absmax.float().contiguous())
        self.register_buffer("code", state.code.float().contiguous())
        self.block = state.blocksize
        self.in_features, self.out_features = bnb_linear.in_features, bnb_linear.out_features
        from . import native

        self.kernel = native.gemv_4bit() if self.in_features % self.block == 0 and self.block % 16 == 0 else None
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place on its first forward into a layout of
        # its own: that would change the bytes the kernel above reads, and it fails outright on matrices whose
        # input width is not a multiple of the block size. Keep bitsandbytes' plain layout in either case.
        if self.kernel is not None or self.in_features % self.block or self.out_features % 32:
            bnb_linear.support_avx512bf16_for_cpu = False

    def kernel_product(self, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, n: int) -> torch.Tensor | None:
        """x (..., in_features) times the 4-bit matrix of `n` output rows given by its packed codes and
        block scales (this layer's own, or several layers' concatenated: `fused_4bit`), by the kernel;
        None when x belongs on bitsandbytes' path (more than ROWS rows, not fp32, not on the CPU, or no
        kernel here)."""
        rows = x.numel() // self.in_features
        if self.kernel is None or rows > self.ROWS or x.dtype != torch.float32 or not x.is_cpu:
            return None
        out = self.kernel(x.reshape(rows, self.in_features), packed, absmax, self.code, n, self.block)
        return out.view(*x.shape[:-1], n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kernel_product(x, self.inner.weight.data.view(-1), self.absmax, self.out_features)
        if out is None:
            return self.inner(x)
        return out if self.inner.bias is None else out + self.inner.bias


def fused_4bit(mods) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None:
    """One kernel call for 4-bit layers that read the same input (q/k/v, gate/up), as the decoder pass
    fuses plain linear layers: their packed codes and block scales are concatenated once and each
    layer's own tensors become views into the concatenation (no second copy; bitsandbytes' path, used
    above `Linear4bit.ROWS` rows, reads the same bytes). Codes are packed row by row and the blocks lie
    inside rows, so the concatenation is exactly the 4-bit matrix of the stacked weights, and every
    output is the one the layer alone computes. None when the layers cannot be fused."""
    first = mods[0]
    if len(mods) < 2 or not all(isinstance(m, Linear4bit) and m.kernel is not None for m in mods):
        return None
    if any(m.in_features != first.in_features or m.block != first.block or m.inner.bias is not None
           or not torch.equal(m.code, first.code) for m in mods):
        return None
    packed, pviews = _concatenated([m.inner.weight.data.reshape(-1) for m in mods])
    absmax, aviews = _concatenated([m.absmax for m in mods])
    for m, p, a in zip(mods, pviews, aviews):
        m.inner.weight.data = p.view(m.inner.weight.data.shape)
        m.absmax = a
    sizes = [m.out_features for m in mods]

    def run(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = first.kernel_product(h, packed, absmax, sum(sizes))
        return tuple(m(h) for m in mods) if out is None else out.split(sizes, dim=-1)

    return run


def _to_4bit(parent: nn.Module, name: str, lin: nn.Linear, quant_type: str) -> None:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type=quant_type,
                          compute_dtype=torch.float32, device="cpu")
    q.weight = bnb.nn.Params4bit(lin.weight.data.float().cpu(), requires_grad=False, quant_type=quant_type)._quantize("cpu")
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.float(), requires_grad=False)
    setattr(parent, name, Linear4bit(q))


def int8_in_4bit(layer: int, name: str) -> bool:
    """Whether a 4-bit option keeps decoder layer `layer`'s linear `name` ("self_attn.q_proj",
    "mlp.down_proj", ...) at int8."""
    return layer < INT8_ATTENTION_LAYERS and name.startswith("self_attn.")


def quantize(model, option: str, keep_int8: Callable[[int, str], bool] = int8_in_4bit) -> dict:
    """Quantize `model` in place for inference; returns a summary (option, modules, weight bytes).
    `keep_int8(layer, name)` picks the decoder linears a 4-bit option leaves at int8."""
    check(option)
    model.eval()
    before = weight_bytes(model)
    n = 0
    if option == "bf16":
        model.to(torch.bfloat16)
        n = sum(1 for _ in model.modules())
    elif option in ("int8", "nf4", "fp4"):
        body = model.model
        for i, layer in enumerate(body.language_model.layers):
            paths = {id(m): p for p, m in layer.named_modules()}
            for parent, name, lin in _linears(layer):
                if option == "int8" or keep_int8(i, f"{paths[id(parent)]}.{name}".lstrip(".")):
                    _to_int8(parent, name, lin)
                else:
                    _to_4bit(parent, name, lin, option)
                n += 1
        others = [(model, "lm_head", model.lm_head)] + _linears(body.vision_tower) + _linears(body.projector)
        for parent, name, lin in others:
            _to_int8(parent, name, lin)
            n += 1
        lm = body.language_model
        lm.embed_tokens = QuantizedEmbedding(lm.embed_tokens.weight, bits=8 if option == "int8" else 4)
        n += 1
    model.config.recfm_quantization = option
    return {"option": option, "modules": n, "weight_bytes_before": before, "weight_bytes": weight_bytes(model)}


def load_quantized(path, quantization: str = "none", dtype: torch.dtype = torch.float32):
    """`RecFMForCausalLM.from_pretrained(path)` with its weights quantized by `quantization`: the
    loader Python users, `recfm eval` and `recfm serve` share."""
    from ..foundation import RecFMForCausalLM

    check(quantization)
    model = RecFMForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if quantization != "none":
        quantize(model, quantization)
    return model


def weight_bytes(model) -> int:
    """Bytes of every weight as stored: parameters and buffers (int8 rows and their scales included),
    and bitsandbytes' 4-bit block scales."""
    total = 0
    seen = set()
    for m in model.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
            state = getattr(t, "quant_state", None)  # bitsandbytes: the block scales
            if state is not None and getattr(state, "absmax", None) is not None:
                total += state.absmax.numel() * state.absmax.element_size()
    return total
