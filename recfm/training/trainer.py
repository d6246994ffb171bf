"""The training recipe: one plain function over builders, for every stage.

    train(TrainConfig) -> run folder

Pretraining reads serialized training histories and learns them by next-item prediction over the
item spans (+ image-text alignment); instruction tuning reads the task mixture; fine-tuning adds
LoRA adapters (PEFT) to a tuned run. The loop is transformers' Trainer, so `torchrun` / `accelerate
launch` give DDP (FSDP by its arguments) with no change here, and bf16 autocast works on CPU and GPU.
Checkpoints are safetensors plus optimizer, scheduler, RNG and data-position state, written to a
staging folder and renamed into place, so a run killed at any moment resumes from a whole checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from datasets import concatenate_datasets
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from .config import TrainConfig, use_bf16

CHECKPOINTS = "checkpoints"


class ShuffledLengthGroupedSampler(torch.utils.data.Sampler):
    """Batches of similar length in random order. transformers' LengthGroupedSampler sorts each
    mega-batch of 50 batches from the longest rows to the shortest, so a short run sees every task
    in a long sawtooth (multimodal rows, then ratings and identifier rows); here the batches are cut
    the same way and then shuffled, so the task mix of every stretch of training stays the dataset's.
    A short last batch stays last (the data loader cuts batches from consecutive indices)."""

    def __init__(self, lengths: list[int], batch_size: int):
        self.lengths, self.batch_size = list(lengths), batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices(self.lengths, self.batch_size)  # the global torch RNG, as transformers'
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        tail = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        perm = torch.randperm(len(batches)).tolist()
        return iter([i for b in [*(batches[k] for k in perm), *tail] for i in b])


class RecFMTrainer(Trainer):
    """Trainer whose checkpoints appear atomically: written under .staging, then renamed, whose batching
    by length keeps the batch order random (ShuffledLengthGroupedSampler), and whose evaluation is a
    `validator` (validation.IdViewValidation) ranking the validation split."""

    def __init__(self, *args, validator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.validator = validator

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if self.validator is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        device = next(self.model.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.args.bf16):  # as training runs it
            found = self.validator(self.model)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in found.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and "length" in getattr(ds, "column_names", ()):
            return ShuffledLengthGroupedSampler(ds["length"], self.args.train_batch_size)
        return super()._get_train_sampler(train_dataset)

    def _save_checkpoint(self, model, trial):
        run_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, ".staging")
        main = self.args.should_save  # under DDP every rank gets here; only the writer may clear and rename
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        if not main:
            return
        final = os.path.join(run_dir, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(os.path.join(staging, name), final)
        shutil.rmtree(staging, ignore_errors=True)
        if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
            # this checkpoint is the best validation so far: its saved state must name where it now lies,
            # so that a resumed run still knows (and keeps) its best checkpoint
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(final, TRAINER_STATE_NAME))
        self._rotate(run_dir)

    def _rotate(self, run_dir: str) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        found = sorted((p for p in Path(run_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                       key=lambda p: int(p.name.split("-")[-1]))
        best = Path(self.state.best_model_checkpoint).resolve() if self.state.best_model_checkpoint else None
        for old in found[:-limit]:  # the newest `limit` stay, and the best validation's (keep_best) too
            if old.resolve() != best:
                shutil.rmtree(old, ignore_errors=True)


def _examples(cfg: TrainConfig, domain, split):
    from ..instructions.examples import build_id_sequence_examples, build_pretraining_examples, build_training_examples

    if cfg.stage == "pretrain":
        return build_pretraining_examples(split, max_history=cfg.max_history, seed=cfg.seed, id_sequence=cfg.id_sequence,
                                          id_readings=cfg.id_readings, history=cfg.pretrain_history)
    tasks = [t for t, w in cfg.tasks.items() if w > 0 and t != "id_sequence"]
    ds = build_training_examples(domain, split, tasks=tasks, per_user=cfg.per_user, max_history=cfg.max_history,
                                 n_candidates=cfg.n_candidates, seed=cfg.seed)
    if _replays_id_sequence(cfg):  # pretraining's identifier-only view, so tuning keeps what it taught
        ds = concatenate_datasets([ds, build_id_sequence_examples(split, cfg.id_sequence)])
        tasks.append("id_sequence")
    # the mixture: each task's examples resampled to its weight relative to the mean weight
    rng = np.random.default_rng(cfg.seed)
    mean_w = float(np.mean([cfg.tasks[t] for t in tasks]))
    parts = []
    task_col = np.asarray(ds["task"])
    for t in tasks:
        idx = np.flatnonzero(task_col == t)
        if not len(idx):
            continue
        n = max(1, int(round(len(idx) * cfg.tasks[t] / mean_w)))
        parts.append(ds.select(rng.choice(idx, size=n, replace=n > len(idx)).tolist()))
    return concatenate_datasets(parts).shuffle(seed=cfg.seed)


def _replays_id_sequence(cfg: TrainConfig) -> bool:
    return cfg.stage != "pretrain" and cfg.id_sequence > 0 and cfg.tasks.get("id_sequence", 0) > 0


def _measure(examples, collator):
    """Each example's length in tokens, as a `length` column (for batching by length). Examples whose
    prompt cannot fit the budget even with no history are left out, and counted."""
    from ..instructions.chat import PromptTooLong

    keep, lengths = [], []
    for k, m in enumerate(examples["messages"]):
        try:
            lengths.append(len(collator.encode(m).input_ids))
            keep.append(k)
        except PromptTooLong:
            pass
    dropped = len(examples) - len(keep)
    examples = examples.select(keep) if dropped else examples
    return examples.add_column("length", lengths), dropped


def _check_same_cold_items(cfg: TrainConfig, init_from: Path) -> None:
    """A cold-item run may only continue a run that never saw those items (the same cold draw)."""
    if cfg.split != "cold_items" or cfg.stage == "finetune":
        return
    info = init_from / "run.json"
    before = json.loads(info.read_text()).get("split", {}) if info.is_file() else {}
    same = before.get("name") == "cold_items" and before.get("cold_fraction") == cfg.cold_fraction \
        and before.get("cold_seed") == cfg.cold_seed
    if not same:
        raise ValueError(f"{init_from} was trained on split {before.get('name', 'leave_one_out')!r}"
                         f"{'' if before.get('name') != 'cold_items' else ' with other cold items'}: its training data "
                         f"holds this run's cold items; start from a run trained with the same split, cold_fraction "
                         f"and cold_seed")


def plot_losses(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in log_history if "loss" in h]
    losses = [h["loss"] for h in log_history if "loss" in h]
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    valid = [(h["step"], h["eval_ndcg@10"]) for h in log_history if "eval_ndcg@10" in h]
    if valid:  # `validation`: the validation split's NDCG@10 on a second axis
        right = ax.twinx()
        right.plot(*zip(*valid), marker="o", color="tab:orange")
        right.set_ylabel("validation NDCG@10", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _validation_args(cfg: TrainConfig) -> dict:
    """TrainingArguments for `validation` / `keep_best`: evaluation (the validator) at each validation, and with
    keep_best a checkpoint at each one too, the best by NDCG@10 loaded at the end."""
    if cfg.validation == "no":
        return {}
    every = {"eval_strategy": cfg.validation, **({"eval_steps": cfg.validation_steps} if cfg.validation == "steps" else {})}
    if not cfg.keep_best:
        return every
    return {**every, "save_strategy": cfg.validation, **({"save_steps": cfg.validation_steps} if cfg.validation == "steps" else {}),
            "load_best_model_at_end": True, "metric_for_best_model": "ndcg@10", "greater_is_better": True}


def _validation_summary(cfg: TrainConfig, state) -> dict:
    """run.json's record of the validations: each one's step and metrics, and the weights the run ended with."""
    if cfg.validation == "no":
        return {}
    points = [{"step": h["step"], "epoch": h.get("epoch"), "ndcg@10": h["eval_ndcg@10"], "hr@10": h["eval_hr@10"],
               "users": h.get("eval_users")} for h in state.log_history if "eval_ndcg@10" in h]
    kept = (state.best_global_step or state.global_step) if cfg.keep_best else state.global_step
    return {"validation": points, "weights_from_step": kept}


def train(cfg: TrainConfig, progress: bool = True, callbacks: list | None = None) -> Path:
    """Run one stage; returns the run folder (loadable with from_pretrained). `callbacks` are
    transformers TrainerCallbacks (metrics, early stopping, checks)."""
    from ..data import ItemIndex, load_domain, make_split
    from ..foundation import RecFMForCausalLM
    from ..foundation.build import build_model
    from ..tokenizers.bundle import Tokenizers
    from ..tokenizers.words import WordVocabulary
    from .collate import Collator, ItemImages, content_catalogue, render_context, training_words

    cfg.validate()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.yaml").write_text(cfg.to_yaml())
    domain = load_domain(cfg.domain)
    split = make_split(domain, cfg.split, cfg.cold_fraction, cfg.cold_seed)
    # the model's training knobs (losses, residual dropout), set on its config whether built or loaded
    knobs = dict(focal_gamma=cfg.focal_gamma, item_residual_dropout=cfg.item_residual_dropout, hidden_dropout=cfg.hidden_dropout,
                 context_loss_weight=cfg.context_loss_weight or (1.0 if cfg.stage == "pretrain" or _replays_id_sequence(cfg)
                                                                 else 0.0),
                 contrastive_loss_weight=cfg.contrastive_loss_weight or (0.1 if cfg.stage == "pretrain" else 0.0))
    if cfg.init_from:
        _check_same_cold_items(cfg, Path(cfg.init_from))
        tokenizers = Tokenizers(cfg.init_from)
        model = RecFMForCausalLM.from_pretrained(cfg.init_from)
        for k, v in knobs.items():
            setattr(model.config, k, v)
        if cfg.stage == "finetune" and tokenizers.index.item_ids != ItemIndex.from_training(split.train, domain.item_ids).item_ids:
            tokenizers.for_domain(domain, split.train)  # a new domain: its items enter through content ids
            model.model.resize_catalogue(len(tokenizers.items))
            if model.model.item_encoder.words is not None and cfg.item_word_grow:  # the new domain's words join
                old = WordVocabulary(tuple(model.config.item_word_vocab), tuple(model.config.item_word_idf))
                grown = old.extend(training_words(tokenizers, domain, cfg.item_word_min_df))
                model.model.extend_words(list(grown.words), list(grown.idf))
                print(f"word vocabulary: {len(old)} words of {cfg.init_from}, {len(grown) - len(old)} new ones shared by "
                      f"item_word_min_df={cfg.item_word_min_df} or more training items of {cfg.domain}")
    else:
        tokenizers = Tokenizers(cfg.tokenizers, cfg.item_mode)
        if cfg.split == "cold_items":  # the vocabulary order from this split's training data: cold items last
            tokenizers.reindex(domain, split.train)
        words = {}
        if cfg.item_mode == "content" and cfg.item_text != "tokens":
            vocab = training_words(tokenizers, domain, cfg.item_word_min_df)
            if not len(vocab):
                raise ValueError(f"item_text {cfg.item_text!r}: no word is shared by item_word_min_df="
                                 f"{cfg.item_word_min_df} training items of {cfg.domain}; lower item_word_min_df")
            words = dict(item_text=cfg.item_text, item_word_vocab=list(vocab.words), item_word_idf=list(vocab.idf))
        model = build_model(cfg.preset, tokenizers, fusion=cfg.fusion, vision=cfg.vision, image_tokens=cfg.image_tokens,
                            text_path=cfg.text_path, vision_path=cfg.vision_path, item_layout=cfg.item_layout,
                            item_id_residual=cfg.item_id_residual, item_image=cfg.item_image, **words, **knobs)
    mc = model.config
    if cfg.split == "cold_items" and mc.item_mode == "atomic":
        raise ValueError(f"{cfg.init_from} has atomic item ids: split cold_items needs content or semantic ids")
    images = ItemImages(domain, mc.vision_config.image_size) if mc.vision_config is not None else None
    if mc.item_mode == "content":
        content_catalogue(model, tokenizers, domain, images)
        model.model.n_trained_items = tokenizers.index.n_train_items  # the training loss's catalogue (seen items first)
    mc.answer_distill = cfg.distill_weight(mc.item_mode)
    if cfg.id_sequence > 0:  # the identifier view this run trains (else the one it inherits, if any)
        mc.id_view_length = cfg.id_sequence
    mc.id_view_weight = cfg.view_weight(mc.item_mode, mc.id_view_length)
    if mc.answer_distill > 0 and mc.item_mode == "semantic":
        raise ValueError(f"answer_distill needs one score per item (atomic or content ids); {cfg.init_from or 'this model'} "
                         "has semantic ids (set answer_distill: 0)")
    examples = _examples(cfg, domain, split)
    collator = Collator(render_context(tokenizers, domain, mc, cfg.max_tokens), images, mc,
                        distill=cfg.id_sequence if mc.answer_distill > 0 else 0)
    examples, too_long = _measure(examples, collator)
    if too_long:
        print(f"dropped {too_long} of {len(examples) + too_long} examples that do not fit max_tokens={cfg.max_tokens} "
              "even without history (raise max_tokens to keep them)")
    originals = None
    if cfg.stage == "finetune":
        from peft import LoraConfig, get_peft_model

        if cfg.qlora:  # a frozen NF4 base under the adapters; its full-precision layers wait for the merge
            from .qlora import quantize_base

            originals = quantize_base(model, torch.bfloat16 if use_bf16(cfg.bf16) else torch.float32)
        # adapters on the language model's projections only (the vision tower has q/k/v_proj too)
        targets = rf"model\.language_model\..*\.({'|'.join(cfg.lora_targets)})"
        # content ids: the item encoder trains in full beside the adapters (a new domain's words and residuals start
        # at zero), and PEFT keeps it in every checkpoint, so a killed fine-tune resumes with it
        full = ["item_encoder"] if mc.item_mode == "content" else None
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=targets, modules_to_save=full, task_type="CAUSAL_LM"))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    steps_per_epoch = math.ceil(len(examples) / (cfg.batch_size * cfg.grad_accum))
    args = TrainingArguments(**{**dict(
        output_dir=str(out / CHECKPOINTS), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, lr_scheduler_type="cosine", warmup_steps=max(
            1, int(cfg.warmup_ratio * (cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.epochs))),
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        bf16=use_bf16(cfg.bf16), seed=cfg.seed, data_seed=cfg.seed, report_to=["tensorboard"],
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=not progress,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        use_cpu=not torch.cuda.is_available(),
    ), **_validation_args(cfg)})
    validator = None
    if cfg.validation != "no":
        from .validation import IdViewValidation

        validator = IdViewValidation(split.valid, Collator(collator.ctx, None, mc), tokenizers.items, mc.id_view_length,
                                     cfg.validation_users, cfg.seed)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "logs")
    trainer = RecFMTrainer(model=model, args=args, train_dataset=examples, data_collator=collator, callbacks=callbacks,
                           eval_dataset=split.valid if validator is not None else None, validator=validator)
    resume = get_last_checkpoint(args.output_dir) if cfg.resume and (out / CHECKPOINTS).exists() else None
    trainer.train(resume_from_checkpoint=resume)
    if not trainer.is_world_process_zero():
        return out
    if cfg.stage == "finetune":
        if originals is not None:
            from .qlora import merge_into_originals

            model = merge_into_originals(model, originals)
        else:
            model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizers.save_pretrained(out)
    (out / "run.json").write_text(json.dumps({
        "stage": cfg.stage, "domain": str(Path(cfg.domain).resolve()),
        "split": {"name": cfg.split, **({"cold_fraction": cfg.cold_fraction, "cold_seed": cfg.cold_seed,
                                         "cold_items": list(split.cold_items)} if cfg.split == "cold_items" else {})}, "item_mode": mc.item_mode, "fusion": mc.fusion,
        "vision": mc.vision_config is not None, "examples": len(examples), "dropped_too_long": too_long, "steps": trainer.state.global_step,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "train_runtime_s": next((h["train_runtime"] for h in reversed(trainer.state.log_history) if "train_runtime" in h), None),
        **_validation_summary(cfg, trainer.state),
    }, indent=2) + "\n")
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
    plot_losses(trainer.state.log_history, out / "loss.png")
    return out
