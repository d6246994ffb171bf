"""The text tokenizer: a byte-level BPE trained on a domain's text, or any local Hugging Face tokenizer.

Either way the result is a `PreTrainedTokenizerFast` that carries recfm's special tokens (chat roles,
the image and item placeholders) and the chat template, so the rest of the code never asks which
one it has.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
IMAGE = "<image>"  # one per image feature vector; the model puts projected image features there
ITEM = "<item>"  # content-mode item: the model computes this position's embedding from the item
ITEM_START, ITEM_END = "<|item|>", "<|/item|>"  # bracket one history item's span
IMG_START, IMG_END = "<|img|>", "<|/img|>"  # bracket generated image codes
RECFM_SPECIAL = [SYSTEM, USER, ASSISTANT, END, IMAGE, ITEM, ITEM_START, ITEM_END, IMG_START, IMG_END]

# Rendering of a conversation whose content parts are already plain strings. The serializer in
# recfm.instructions renders images and items itself (it needs the catalogue), but the template is
# kept on the tokenizer so that text-only users of `apply_chat_template` get the same layout.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{% elif m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}"
    "<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
                         show_progress: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` (the vocabulary covers every byte, so nothing is ever unknown)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[PAD, BOS, EOS, UNK, *RECFM_SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    return _finish(fast)


def load_text_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A local Hugging Face tokenizer (a pretrained LM's, or one saved by recfm), with recfm's tokens."""
    from .. import foundation  # noqa: F401  registers model type "recfm", which a run folder's config.json names

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or PAD
    if tok.bos_token is None:
        tok.add_special_tokens({"bos_token": BOS})
    return _finish(tok)


def _finish(tok) -> PreTrainedTokenizerFast:
    missing = [t for t in RECFM_SPECIAL if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False) \
            if _supports_replace(tok) else tok.add_tokens(missing, special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.init_kwargs["recfm_tokenizer_version"] = 1
    return tok


def _supports_replace(tok) -> bool:
    import inspect

    return "replace_extra_special_tokens" in inspect.signature(tok.add_special_tokens).parameters
