"""Quantized weights for inference, applied when a run is loaded (one loader for every precision).

Options, each measured on this project's CPU benchmark (`benchmarks/quant_bench.py`):

- `none`: the checkpoint's fp32 weights.
- `bf16`: every weight in bfloat16 (the KV cache follows). Half the bytes; on CPUs without bf16
  units the matrix products are emulated, which helps one-at-a-time decoding (memory-bound) and
  hurts batches.
- `int8`: the decoder's linear layers as int8 weights with per-channel scales, run by PyTorch's
  dynamic-quantization kernels (fbgemm/oneDNN "x86": activations quantized per call, int8 x int8
  products, int32 accumulation). The vision tower, the projector, the embeddings, the norms, the
  output head (which scores every item in atomic mode) and the content-item encoder stay in fp32.
- `nf4`, `fp4`: the decoder's linear layers as bitsandbytes 4-bit weights (blocks of 64 with an
  fp32 scale), dequantized per call; the same parts as for int8 stay in fp32.

An option this machine cannot run (bitsandbytes missing, no int8 kernel engine) is an error when
the model is loaded, never later.
"""

from __future__ import annotations

import torch
from torch import nn

OPTIONS = ("none", "bf16", "int8", "nf4", "fp4")


class QuantizationError(ValueError):
    pass


def check(option: str) -> None:
    """Raise now if `option` cannot run here."""
    if option not in OPTIONS:
        raise QuantizationError(f"unknown quantization {option!r}; choose one of {', '.join(OPTIONS)}")
    if option == "int8":
        engines = torch.backends.quantized.supported_engines
        if not any(e in engines for e in ("x86", "fbgemm", "onednn")):
            raise QuantizationError(f"int8 needs PyTorch's x86/fbgemm quantized kernels; this build has {engines}")
    if option in ("nf4", "fp4"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise QuantizationError(f"{option} needs bitsandbytes (pip install 'bitsandbytes>=0.47', which runs on "
                                    "CPU too)") from None


def _decoder_linears(model) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, module) of every nn.Linear inside the decoder layers."""
    out = []
    for parent in model.model.language_model.layers.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                out.append((parent, name, child))
    return out


def quantize(model, option: str) -> dict:
    """Quantize `model` in place for inference; returns a summary (option, modules, weight bytes)."""
    check(option)
    model.eval()
    before = weight_bytes(model)
    n = 0
    if option == "bf16":
        model.to(torch.bfloat16)
        n = sum(1 for _ in model.modules())
    elif option == "int8":
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        engines = torch.backends.quantized.supported_engines
        torch.backends.quantized.engine = "x86" if "x86" in engines else ("fbgemm" if "fbgemm" in engines else "onednn")
        for parent, name, lin in _decoder_linears(model):
            lin.qconfig = per_channel_dynamic_qconfig
            setattr(parent, name, DynamicLinear.from_float(lin))
            n += 1
    elif option in ("nf4", "fp4"):
        import bitsandbytes as bnb

        for parent, name, lin in _decoder_linears(model):
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type=option,
                                  compute_dtype=torch.float32, device="cpu")
            q.weight = bnb.nn.Params4bit(lin.weight.data.float().cpu(), requires_grad=False, quant_type=option)._quantize("cpu")
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data.float(), requires_grad=False)
            setattr(parent, name, q)
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
    """Bytes of every weight as stored: parameters, buffers, and packed quantized weights."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

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
        if isinstance(m, DynamicLinear):  # packed int8 weights are not parameters
            w, b = m.weight(), m.bias()
            total += w.numel() * w.element_size()  # int8
            per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
            total += (w.q_per_channel_scales().numel() if per_channel else 1) * 16  # fp64 scale + int64 zero point
            if b is not None:
                total += b.numel() * b.element_size()
    return total
