"""Pretraining, multitask instruction tuning, LoRA fine-tuning on a new domain, checkpoints and
distributed launch: `train(TrainConfig)` runs any stage."""

from .config import TrainConfig
from .trainer import train

__all__ = ["TrainConfig", "train"]
