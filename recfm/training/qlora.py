"""QLoRA: fine-tuning LoRA adapters over a frozen 4-bit base (bitsandbytes NF4), as Dettmers et al.

    originals = quantize_base(model)          # the language model's linear layers -> bnb Linear4bit
    model = get_peft_model(model, lora)       # adapters over the 4-bit layers; train
    model = merge_into_originals(model, originals)

The base's full-precision linear layers are kept aside while training. The saved model is those
weights plus each adapter's delta: the adapters are merged into the original weights, not into a
dequantized copy, so a layer without an adapter comes back bit for bit. bitsandbytes quantizes on a
GPU, and on a CPU too, so the same path is tested here without one.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_base(model, compute_dtype: torch.dtype = torch.float32) -> dict[str, nn.Linear]:
    """Replace every linear layer of `model.model.language_model` with a frozen NF4 bitsandbytes layer
    on the model's device; returns the replaced full-precision layers by module path."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("qlora needs bitsandbytes (pip install 'recfm[quant]' or 'bitsandbytes>=0.47', which runs on "
                         "CPU too)") from None
    lm = model.model.language_model
    originals: dict[str, nn.Linear] = {}
    for name, module in list(lm.named_modules()):
        if type(module) is not nn.Linear:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        device = module.weight.device
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data.float().clone(), requires_grad=False, quant_type="nf4").to(device)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        setattr(parent, leaf, q)
        originals[f"model.language_model.{name}"] = module
    return originals


def merge_into_originals(peft_model, originals: dict[str, nn.Linear]):
    """The base model with every 4-bit layer replaced by its original: plus the adapter's delta where
    LoRA wrapped it, unchanged where not; then PEFT's own unload for the rest (modules trained in
    full, e.g. the item encoder). Returns the unwrapped base model."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    for path, original in originals.items():
        module = base.get_submodule(path)
        if isinstance(module, LoraLayer):
            with torch.no_grad():
                for adapter in module.active_adapters:
                    original.weight += module.get_delta_weight(adapter).to(original.weight.device, original.weight.dtype)
        parent_name, _, leaf = path.rpartition(".")
        setattr(base.get_submodule(parent_name), leaf, original)
    return peft_model.merge_and_unload()
