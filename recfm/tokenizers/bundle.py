"""The tokenizers of one model, assembled: what `recfm tokenize` wrote (or a run folder holds) put
together for one item mode, and saved next to the model."""

from __future__ import annotations

import json
from pathlib import Path


class Tokenizers:
    """Everything `recfm tokenize` wrote, assembled for one item mode: the text tokenizer with the
    item tokens and the image-code tokens added (in that order), the bound item tokenizer, the
    VQ tokenizer and every catalogue image's codes."""

    def __init__(self, folder: str | Path, item_mode: str = "atomic", with_image_codes: bool = True):
        """`folder` is either what `recfm tokenize` wrote (tokens are added here) or a model run
        folder written by `save_pretrained` (already assembled; `item_mode` is read from it)."""
        from ..data import ItemIndex
        from .items import CONFIG_NAME, ItemTokenizer
        from .text import load_text_tokenizer

        folder = Path(folder)
        assembled = (folder / CONFIG_NAME).exists()
        self.folder = folder
        self.text = load_text_tokenizer(folder if assembled else folder / "text")
        self.items = ItemTokenizer.from_pretrained(folder if assembled else folder / "items" / item_mode)
        self.item_mode = self.items.mode
        self.index = ItemIndex.load(folder / "item_index.json")
        if not assembled:
            self.text.add_tokens(self.items.new_tokens(), special_tokens=True)
        self.items.bind(self.text)
        self.vq = None
        self.image_codes: dict[str, list[int]] = {}
        if with_image_codes and (folder / "vq").exists():
            from .vq import VQTokenizer

            self.vq = VQTokenizer.from_pretrained(folder / "vq")
            if not assembled:
                self.text.add_tokens(self.vq.token_strings(), special_tokens=True)
            self.image_codes = json.loads((folder / "image_codes.json").read_text())

    def reindex(self, domain, train_split) -> Tokenizers:
        """A new item index (vocabulary order) from `train_split` of the same domain: a cold-item run
        must not order its cold items by how popular they were in another split's training data.
        Content ids follow the index; semantic ids are codes of each item's content and do not move."""
        from ..data import ItemIndex
        from .items import ContentItemTokenizer

        if self.item_mode == "atomic":
            raise ValueError("atomic item ids are the item index itself; re-index before tokenizing instead")
        self.index = ItemIndex.from_training(train_split, domain.item_ids)
        if self.item_mode == "content":
            self.items = ContentItemTokenizer(self.index.item_ids).bind(self.text)
        return self

    def for_domain(self, domain, train_split) -> Tokenizers:
        """Re-point these tokenizers at a new domain (fine-tuning): a new item index from its training
        split, and its images' VQ codes. Only content ids carry over without new vocabulary; atomic and
        semantic ids name the old catalogue's items."""
        from ..data import ItemIndex
        from .items import ContentItemTokenizer

        if self.item_mode != "content":
            raise ValueError(f"a tuned model with {self.item_mode} item ids cannot name a new domain's items without "
                             "new vocabulary; fine-tune a content-mode model (item_mode: content) on new domains")
        self.index = ItemIndex.from_training(train_split, domain.item_ids)
        self.items = ContentItemTokenizer(self.index.item_ids).bind(self.text)
        self.image_codes = {}
        if self.vq is not None:
            with_image = [(iid, domain.image(iid)) for iid in self.index.item_ids if domain.image_path(iid) is not None]
            for start in range(0, len(with_image), 256):
                batch = with_image[start : start + 256]
                codes = self.vq.encode([im for _, im in batch])
                self.image_codes.update({iid: c.tolist() for (iid, _), c in zip(batch, codes)})
        return self

    @property
    def image_code_offset(self) -> int | None:
        return self.text.convert_tokens_to_ids("<img_0>") if self.vq is not None else None

    @property
    def codebook_size(self) -> int:
        return self.vq.config.codebook_size if self.vq is not None else 0

    def save_pretrained(self, out: str | Path) -> None:
        """Write the assembled text tokenizer and the item tokenizer next to a model."""
        out = Path(out)
        self.text.save_pretrained(out)
        self.items.save_pretrained(out)
        self.index.save(out / "item_index.json")
        if self.vq is not None:
            self.vq.save_pretrained(out / "vq")
            (out / "image_codes.json").write_text(json.dumps(self.image_codes) + "\n")
