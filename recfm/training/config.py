"""Training configuration: data, not code. Every field has a default and a comment; a YAML file
names only what it changes (`recfm tune --config my.yaml`, or `--set key=value` on the command line)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

DEFAULT_TASK_WEIGHTS = {
    "next_item": 2.0, "pick_candidate": 1.0, "explanation": 1.0, "yes_no": 1.0, "which_image": 1.0,
    "rating": 1.0, "review": 1.0, "image_generation": 1.0,
    "id_sequence": 1.0,  # replay of pretraining's identifier-only view (only with id_sequence > 0)
}

# answer_distill's weight where it applies and the config leaves it unset: on MovieLens's validation split (seed 0)
# prompts ranked at NDCG@10 0.047 with weight 1, 0.047 with weight 5 and 0.036 without
AUTO_ANSWER_DISTILL = 1.0
# id_view_weight where the model has an identifier view and the config leaves it unset: on MovieLens's validation
# split (seed 0, the 450-step distilled recipe) the seen-template prompt ranked at NDCG@10 0.068 alone, 0.077 /
# 0.081 / 0.085 / 0.084 / 0.084 fused at weight 0.25 / 0.5 / 1 / 2 / 4; the identifier view alone at 0.082
AUTO_ID_VIEW_WEIGHT = 1.0


@dataclass
class TrainConfig:
    # --- what to train ---
    stage: str = "tune"  # pretrain | tune | finetune
    domain: str = ""  # a domain folder (recfm data prepare)
    tokenizers: str = ""  # a tokenizer folder (recfm tokenize); not needed with init_from
    output: str = "runs/run"  # the run folder: model, tokenizers, logs, loss curve
    init_from: str | None = None  # a previous run folder to continue from (tune after pretrain; finetune)
    # --- the model, when not init_from ---
    preset: str = "small"  # tiny | small | base
    fusion: str = "early"  # early | cross_attention
    item_mode: str = "atomic"  # atomic | semantic | content
    vision: str | None = "clip"  # clip | siglip | null (a text-only model: the no-image ablation)
    image_tokens: int = 2  # vectors per image (1-8)
    item_layout: str = "content_first"  # content_first | id_first: where a history item's identifier goes (see RecFMConfig)
    text_path: str | None = None  # bring your own: a local Hugging Face causal LM checkpoint
    vision_path: str | None = None  # bring your own: a local CLIP/SigLIP checkpoint
    # --- data ---
    split: str = "leave_one_out"  # leave_one_out | cold_items (train without a seeded share of the items, to measure new ones)
    cold_fraction: float = 0.05  # cold_items: the share of items left out of training
    cold_seed: int = 0  # cold_items: which items (kept apart from `seed`, so runs of several seeds share them)
    tasks: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))  # task mixture (tune)
    per_user: int = 3  # (history -> next item) points drawn per user's training sequence
    max_history: int = 20  # history items per prompt (oldest dropped first)
    max_tokens: int = 1024  # prompt budget in tokens
    id_sequence: int = 50  # also read each training sequence as identifiers only, in chunks of this many items (0 = off;
    # pretraining adds these rows, tuning replays them at the mixture's id_sequence weight, with the context loss on)
    id_readings: int = 1  # pretraining reads each sequence's identifier-only rows this many times, chunk borders shifted
    pretrain_history: bool = True  # pretraining reads the multimodal history rows; false: identifier-only rows alone
    # (a cheap stage of several passes over the sequences, e.g. between pretraining and tuning; needs id_sequence > 0)
    group_by_length: bool = False  # batch rows of similar token length (transformers' LengthGroupedSampler): a short
    # identifier-only row then costs a fraction of a multimodal one. Off: in the quickstart it cut training time
    # (9.5 vs 12.0 min) but explanation BLEU-4 fell from 20 to 1.1 and next-item NDCG@10 from 0.032 to 0.024
    n_candidates: int = 10  # candidates in pick-from-candidates prompts
    # --- optimisation ---
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    bf16: bool | str = "auto"  # bf16 autocast: auto = on a GPU, or a CPU whose torch kernels use AVX-512
    seed: int = 0
    gradient_checkpointing: bool = False
    # --- losses ---
    focal_gamma: float = 0.0  # > 0: focal re-weighting of answer tokens (UniMP)
    hidden_dropout: float = 0.0  # dropout on the decoder's input vectors and on each attention and MLP output
    # before its residual add, in this stage's training only (SASRec's regularisation; Llama has none)
    context_loss_weight: float = 0.0  # predict history items' identifiers (pretrain sets 1.0)
    contrastive_loss_weight: float = 0.0  # image-text alignment (pretrain sets 0.1)
    answer_distill: float | None = None  # tune/finetune: weight of a KL term that teaches each next-item prompt's
    # answer position the model's own identifier-view distribution over the catalogue for the same history (its
    # newest id_sequence items; the teacher pass runs without gradient): that view learns next-item prediction at
    # every position of every sequence, the prompt's answer position at one. null: AUTO_ANSWER_DISTILL where it
    # applies (tune or finetune, id_sequence > 0, atomic or content ids), else 0; 0 turns it off
    id_view_weight: float | None = None  # saved in the run: its next-item rankings from a prompt (recfm eval,
    # /v1/recommendations) add this weight times the identifier view's log-probabilities over the same history.
    # null: AUTO_ID_VIEW_WEIGHT where the model has that view (id_sequence > 0 here or in the run it continues,
    # atomic or content ids), else 0; 0: the prompt alone
    # Content ids of a new model read an item as its shared words, with no per-item vector and no image in the
    # item vector: on MovieLens, tokens, residuals and item images each kept new items out of the top 10; this
    # setting reached full-ranking HR@10 0.148 on one draw of new items (0.000 on a second, 0.000 for tokens +
    # residuals + images on the first) and lost nothing on warm items (NDCG@10 0.021 vs 0.019)
    item_id_residual: bool = False  # content ids, a new model: a learned per-item vector added to each item's
    # content vector; false: items are their content alone (the inductive setting: warm and new items scored alike)
    item_residual_dropout: float = 0.0  # content ids: the share of items read from their content alone in each
    # training pass (their learned per-item residual dropped, as in DropoutNet); 0.5 did not help cold items
    item_text: str = "words"  # content ids, a new model: how the item encoder reads an item's text: "words"
    # (learned vectors of the words item_word_min_df or more training items share, TF-IDF weighted: new items
    # are read from the same words as warm ones), "tokens" (mean token embedding: a title's own tokens work as
    # a second identifier, and new items sank below every warm one) or "both"
    item_word_min_df: int = 10  # words: a word enters the vocabulary when this many training items have it
    item_word_grow: bool = True  # finetune on a new domain, words: add the words item_word_min_df or more of its
    # training items share (zero vectors, learned with the item encoder); false: read it with the old words only
    item_image: bool = False  # content ids, a new model: the item encoder reads each item's image too (prompts
    # show history images either way); on MovieLens's new items the poster in the item vector hurt (0.000 vs 0.148)
    # --- LoRA (finetune) ---
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    qlora: bool = False  # finetune: the language model's linear layers frozen as NF4 bitsandbytes weights under the
    # adapters (QLoRA; GPU or CPU), the adapters merged into the original weights at the end
    # --- choosing the weights on the validation split (SASRec's early stopping, through transformers' Trainer) ---
    validation: str = "no"  # no | epoch | steps: when to rank the leave-one-out validation split's next items in the
    # identifier view (NDCG@10 and HR@10, full ranking, the user's training items masked; logged as eval_ndcg@10)
    validation_steps: int = 0  # validation: steps: every this many steps
    validation_users: int = 0  # rank this many validation users (a seeded sample, the same at every validation); 0: all
    keep_best: bool = False  # end with the weights of the validation with the best NDCG@10 instead of the last ones
    # (needs validation; a checkpoint is then written at each validation and the best one is never rotated away)
    # --- checkpoints and logs ---
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 10
    resume: bool = True  # continue from the newest checkpoint in output/checkpoints if there is one

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text()) if path else {}
        data = {**(data or {}), **{k: v for k, v in overrides.items() if v is not None}}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config field(s) {unknown}{f' in {path}' if path else ''}; "
                             f"known: {sorted(known)}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.stage not in ("pretrain", "tune", "finetune"):
            raise ValueError(f"stage must be pretrain, tune or finetune, got {self.stage!r}")
        if not self.domain:
            raise ValueError("a domain folder is needed (domain: ...)")
        if not self.init_from and not self.tokenizers:
            raise ValueError("give tokenizers (a recfm tokenize folder) or init_from (a run folder)")
        if self.stage == "finetune" and not self.init_from:
            raise ValueError("finetune starts from a tuned run: set init_from")
        from ..foundation.configuration import ITEM_LAYOUTS

        if self.item_layout not in ITEM_LAYOUTS:
            raise ValueError(f"item_layout must be one of {ITEM_LAYOUTS}, got {self.item_layout!r}")
        from ..data.splits import SPLITS

        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.split == "cold_items" and not self.init_from and self.item_mode == "atomic":
            raise ValueError("split cold_items needs content or semantic item ids: an atomic id of an item that is "
                             "never in training is never trained (item_mode: content or semantic)")
        if self.id_readings < 1 or (self.id_sequence > 0 and self.id_readings > self.id_sequence):
            raise ValueError(f"id_readings must be between 1 and id_sequence ({self.id_sequence}), got {self.id_readings}")
        if not self.pretrain_history and (self.stage != "pretrain" or self.id_sequence <= 0):
            raise ValueError("pretrain_history: false is a pretraining stage of identifier-only rows: it needs "
                             f"stage pretrain and id_sequence > 0 (got stage {self.stage!r}, id_sequence {self.id_sequence})")
        if self.answer_distill is not None and self.answer_distill < 0:
            raise ValueError(f"answer_distill is a loss weight, >= 0; got {self.answer_distill}")
        if (self.answer_distill or 0) > 0 and (self.stage == "pretrain" or self.id_sequence <= 0):
            raise ValueError("answer_distill teaches next-item prompts the identifier view's distribution: it needs "
                             f"stage tune or finetune and id_sequence > 0 (got stage {self.stage!r}, id_sequence "
                             f"{self.id_sequence})")
        if self.id_view_weight is not None and self.id_view_weight < 0:
            raise ValueError(f"id_view_weight is a weight, >= 0; got {self.id_view_weight}")
        if self.qlora and self.stage != "finetune":
            raise ValueError(f"qlora is a fine-tuning setting (LoRA over a 4-bit base): stage finetune, not {self.stage!r}")
        if not 0 <= self.hidden_dropout < 1:
            raise ValueError(f"hidden_dropout must be in [0, 1), got {self.hidden_dropout}")
        if not 0 <= self.item_residual_dropout < 1:
            raise ValueError(f"item_residual_dropout must be in [0, 1), got {self.item_residual_dropout}")
        if self.item_text not in ("tokens", "words", "both"):
            raise ValueError(f"item_text must be tokens, words or both, got {self.item_text!r}")
        if self.item_word_min_df < 1:
            raise ValueError(f"item_word_min_df must be at least 1, got {self.item_word_min_df}")
        if not 0 < self.cold_fraction < 1:
            raise ValueError(f"cold_fraction must be between 0 and 1, got {self.cold_fraction}")
        if self.validation not in ("no", "epoch", "steps"):
            raise ValueError(f"validation must be no, epoch or steps, got {self.validation!r}")
        if self.validation == "steps" and self.validation_steps < 1:
            raise ValueError(f"validation: steps needs validation_steps >= 1, got {self.validation_steps}")
        if self.validation != "no" and self.split != "leave_one_out":
            raise ValueError(f"validation ranks the leave-one-out validation split; split {self.split!r} has none")
        if self.keep_best and self.validation == "no":
            raise ValueError("keep_best keeps the weights of the best validation: set validation to epoch or steps")
        if self.validation_users < 0:
            raise ValueError(f"validation_users must be >= 0 (0: all), got {self.validation_users}")
        unknown = set(self.tasks) - set(DEFAULT_TASK_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown task(s) in the mixture: {sorted(unknown)}")

    def distill_weight(self, item_mode: str) -> float:
        """The answer_distill weight this stage trains with, for a model with these item ids."""
        if self.answer_distill is not None:
            return self.answer_distill
        applies = self.stage != "pretrain" and self.id_sequence > 0 and item_mode in ("atomic", "content")
        return AUTO_ANSWER_DISTILL if applies else 0.0

    def view_weight(self, item_mode: str, id_view_length: int) -> float:
        """The id_view_weight this run saves, for a model with these item ids and identifier view length."""
        if self.id_view_weight is not None:
            if self.id_view_weight > 0 and id_view_length <= 0:
                raise ValueError("id_view_weight fuses the identifier view into next-item rankings: it needs a model "
                                 "with that view (id_sequence > 0)")
            return self.id_view_weight
        return AUTO_ID_VIEW_WEIGHT if id_view_length > 0 and item_mode in ("atomic", "content") else 0.0

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def use_bf16(setting: bool | str) -> bool:
    """Resolve the bf16 setting. On a CPU without AVX-512 (torch capability AVX2), bf16 matmuls are
    emulated and run several times slower than fp32, so "auto" keeps fp32 there."""
    if setting != "auto":
        return bool(setting)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
