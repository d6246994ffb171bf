"""The backbone: config, vision tower, projector/resampler, cross-modal fusion, the language model and
output heads, as Hugging Face-compatible classes. Importing this package registers them with the
Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` works without trust_remote_code."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import PRESETS, RecFMConfig, build_config
from .modeling import RecFMForCausalLM, RecFMModel, token_image_index

AutoConfig.register("recfm", RecFMConfig, exist_ok=True)
AutoModel.register(RecFMConfig, RecFMModel, exist_ok=True)
AutoModelForCausalLM.register(RecFMConfig, RecFMForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "RecFMConfig", "RecFMForCausalLM", "RecFMModel", "build_config", "token_image_index"]
