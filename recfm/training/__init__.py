"""Pretraining, multitask instruction tuning, LoRA fine-tuning on a new domain, checkpoints and
distributed launch: `train(TrainConfig)` runs any stage."""

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name):  # `train` pulls in transformers' Trainer, peft and bitsandbytes: import it when asked
    if name == "train":
        from .trainer import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
