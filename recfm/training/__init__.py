"""Pretraining, multitask instruction tuning, LoRA fine-tuning on a new domain, checkpoints and distributed launch."""
