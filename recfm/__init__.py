"""recfm: a multimodal foundation model for recommendation."""

__version__ = "0.1.0"
