"""RecFMConfig and the named model sizes.

A RecFM model is a Llama-family language model (`text_config`), an optional vision tower
(`vision_config`, CLIP or SigLIP vision), a projector that turns one image into `image_tokens`
vectors, and a fusion mode. The token ids the model must recognise (the image placeholder, item
brackets, the content-item placeholder, the first item and image-code token) are set from the
tokenizer by `build_config`, so the config alone says how to read a sequence.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

FUSIONS = ("early", "cross_attention")
ITEM_MODES = ("atomic", "semantic", "content")
ITEM_LAYOUTS = ("content_first", "id_first")
ITEM_TEXTS = ("tokens", "words", "both")
PROJECTORS = ("mlp", "resampler")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@strict
class RecFMConfig(PreTrainedConfig):
    model_type = "recfm"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    # vision -> language
    projector: str = "mlp"
    image_tokens: int = 2  # vectors per image (1 to 8)
    freeze_vision: bool = True
    image_mean: list[float] | tuple[float, ...] = CLIP_MEAN
    image_std: list[float] | tuple[float, ...] = CLIP_STD
    # fusion
    fusion: str = "early"
    cross_attention_every: int = 2  # a gated cross-attention block before every k-th decoder layer
    # items
    item_mode: str = "atomic"
    n_items: int = 0
    item_token_offset: int = -1  # atomic: id of <item_0>; semantic: id of the first code token
    n_item_tokens: int = 0
    item_id_residual: bool = True  # content mode: a learned per-item vector added to the content embedding
    item_residual_dropout: float = 0.0  # content mode, training only: share of item vectors read without it
    item_text_len: int = 32  # content mode: tokens (or words) of an item's text the item encoder reads
    # content mode: what of an item's text the item encoder reads: "tokens" (the mean embedding of its
    # text's tokens), "words" (a learned vector per word of `item_word_vocab`, TF-IDF weighted) or "both"
    item_text: str = "tokens"
    item_word_vocab: list[str] | tuple[str, ...] = ()  # words mode: the vocabulary (recfm.tokenizers.words)
    item_word_idf: list[float] | tuple[float, ...] = ()
    item_image: bool = True  # content mode: the item encoder reads the item's image (prompts show images either way)
    # how a history item is serialized: "content_first" <|item|> <image> <id> title <|/item|>, or
    # "id_first" <|item|> <id> <image> title <|/item|> (the context loss then predicts each history
    # item from the items before it instead of from its own picture)
    item_layout: str = "content_first"
    # special token ids (from the tokenizer)
    image_token_id: int = -1
    item_token_id: int = -1  # content-mode placeholder
    item_start_id: int = -1
    item_end_id: int = -1
    image_code_offset: int = -1  # id of <img_0>
    image_codebook_size: int = 0
    image_grid: int = 8
    img_start_id: int = -1
    img_end_id: int = -1
    # losses
    focal_gamma: float = 0.0
    # training only: dropout on the decoder's input vectors and on each attention and MLP output before its
    # residual add (SASRec's regularisation; the Llama decoder has none of its own)
    hidden_dropout: float = 0.0
    context_loss_weight: float = 0.0
    contrastive_loss_weight: float = 0.0
    contrastive_temperature: float = 0.07
    answer_distill: float = 0.0  # KL from the identifier view's next-item distribution to a prompt's answer position
    # next-item rankings from a prompt (recfm eval, /v1/recommendations) add this weight times the identifier
    # view's log-probabilities over the same history (its newest id_view_length items); 0: the prompt alone
    id_view_weight: float = 0.0
    id_view_length: int = 0  # the identifier view's history length in training (id_sequence); 0: no such view
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.item_mode not in ITEM_MODES:
            raise ValueError(f"item_mode must be one of {ITEM_MODES}, got {self.item_mode!r}")
        if self.item_text not in ITEM_TEXTS:
            raise ValueError(f"item_text must be one of {ITEM_TEXTS}, got {self.item_text!r}")
        if self.item_mode == "content" and self.item_text != "tokens" and not self.item_word_vocab:
            raise ValueError(f"item_text {self.item_text!r} needs item_word_vocab (the words the item encoder reads)")
        if self.item_layout not in ITEM_LAYOUTS:
            raise ValueError(f"item_layout must be one of {ITEM_LAYOUTS}, got {self.item_layout!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if not 1 <= self.image_tokens <= 8:
            raise ValueError(f"image_tokens must be between 1 and 8, got {self.image_tokens}")
        if self.id_view_weight < 0 or self.id_view_length < 0:
            raise ValueError(f"id_view_weight and id_view_length must be 0 or more, got {self.id_view_weight}, "
                             f"{self.id_view_length}")
        if self.cross_attention_every < 1:
            raise ValueError("cross_attention_every must be at least 1")

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    def cross_attention_layers(self) -> list[int]:
        if self.fusion != "cross_attention" or self.vision_config is None:
            return []
        n = self.text_config.num_hidden_layers
        return [i for i in range(n) if (i + 1) % self.cross_attention_every == 0] or [n - 1]


# Named sizes. Dims only: vocabulary and token ids come from the tokenizer (see build_config).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {  # tests: < 5M parameters
        "text": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=2048),
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8),
    },
    "small": {  # quickstart and CPU benchmarks: ~10-30M
        "text": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                     num_key_value_heads=2, max_position_embeddings=4096),
        "vision": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, patch_size=8),
    },
    "base": {  # GPU: ~100-300M
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=4, max_position_embeddings=4096),
        "vision": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, patch_size=8),
    },
}


def build_config(preset: str = "tiny", *, tokenizer=None, vocab_size: int | None = None, image_size: int = 32,
                 vision: str | None = "clip", item_tokenizer=None, n_items: int | None = None,
                 image_codebook_size: int = 0, image_grid: int = 8, text_path: str | None = None,
                 vision_path: str | None = None, **overrides) -> RecFMConfig:
    """A RecFMConfig from a preset (or, "bring your own": `text_path` / `vision_path` to local HF
    checkpoints, whose configs are used as they are), with token ids read from `tokenizer`.

    `vision=None` builds a text-only model (images are ignored: the "no images" ablation).
    """
    from ..tokenizers import text as T

    if preset not in PRESETS and not text_path:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or give text_path")
    p = PRESETS.get(preset, PRESETS["tiny"])
    if text_path:
        text_config = AutoConfig.from_pretrained(text_path, local_files_only=True).to_dict()
    else:
        text_config = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                           **p["text"])
    if tokenizer is not None:
        vocab_size = len(tokenizer)
    if vocab_size is not None:
        text_config["vocab_size"] = max(vocab_size, text_config.get("vocab_size", 0) if text_path else 0)
    vision_config = None
    if vision_path:
        vision_config = AutoConfig.from_pretrained(vision_path, local_files_only=True)
        vision_config = getattr(vision_config, "vision_config", vision_config).to_dict()
    elif vision is not None:
        kind = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}.get(vision)
        if kind is None:
            raise ValueError(f"vision must be 'clip', 'siglip' or None, got {vision!r}")
        vision_config = dict(model_type=kind, image_size=image_size, num_channels=3, **p["vision"])
    ids: dict[str, int] = {}
    if tokenizer is not None:
        conv = tokenizer.convert_tokens_to_ids
        ids = dict(image_token_id=conv(T.IMAGE), item_token_id=conv(T.ITEM), item_start_id=conv(T.ITEM_START),
                   item_end_id=conv(T.ITEM_END), img_start_id=conv(T.IMG_START), img_end_id=conv(T.IMG_END),
                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
        if image_codebook_size:
            ids["image_code_offset"] = conv("<img_0>")
        text_config.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    items: dict[str, Any] = {}
    if item_tokenizer is not None:
        items = dict(item_mode=item_tokenizer.mode, n_items=len(item_tokenizer))
        if item_tokenizer.mode != "content" and item_tokenizer.is_bound:
            vocab_ids = item_tokenizer.vocab_ids
            items.update(item_token_offset=int(vocab_ids.min()), n_item_tokens=len(vocab_ids))
    elif n_items is not None:
        items = dict(n_items=n_items)
    cfg = dict(text_config=text_config, vision_config=vision_config, image_codebook_size=image_codebook_size,
               image_grid=image_grid, **ids, **items)
    cfg.update(overrides)
    return RecFMConfig(**cfg)
