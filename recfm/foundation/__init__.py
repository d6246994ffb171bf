"""The backbone: config, vision tower, projector/resampler, cross-modal fusion, the language model and output heads, as Hugging Face-compatible classes."""
