"""Constrained decoding: which tokens a sequence may produce next, given what it produced so far.

- `ItemConstraint`: the output is exactly one item identifier (any of the catalogue, or a given
  subset), then the end token: decoded under the prefix trie of those items' codes, so only real
  items come out. An optional bias on the first token's logits fuses another view into the answer
  (the chat route's identifier view, atomic ids: one token an item).
- `ImageGridConstraint`: <|img|>, exactly grid x grid image-code tokens, <|/img|>, then the end
  token; every such output decodes to a picture.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..tokenizers.trie import PrefixTrie


class Constraint:
    def allowed(self, generated: Sequence[int]) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def bias(self, generated: Sequence[int]):
        """(token ids, values) to add to the next token's logits after the mask, or None."""
        return None


class ItemConstraint(Constraint):
    def __init__(self, item_tokenizer, end_token_id: int, item_ids: Sequence[str] | None = None):
        if item_ids is None:
            self.trie = item_tokenizer.trie
        else:
            if not item_ids:
                raise ValueError("no items left to choose from")
            self.trie = PrefixTrie([item_tokenizer.encode(i) for i in item_ids])
        self.end = np.array([end_token_id], dtype=np.int64)
        self.first_bias = None  # (token ids, values) added to the first token's logits: a fused chat answer

    def allowed(self, generated):
        nxt = self.trie.allowed(generated)
        return nxt if len(nxt) else self.end

    def bias(self, generated):
        return self.first_bias if not len(generated) else None


class ImageGridConstraint(Constraint):
    def __init__(self, img_start_id: int, img_end_id: int, code_offset: int, codebook_size: int, n_codes: int,
                 end_token_id: int):
        self.start = np.array([img_start_id], dtype=np.int64)
        self.stop = np.array([img_end_id], dtype=np.int64)
        self.codes = np.arange(code_offset, code_offset + codebook_size, dtype=np.int64)
        self.n = n_codes
        self.end = np.array([end_token_id], dtype=np.int64)

    def allowed(self, generated):
        step = len(generated)
        if step == 0:
            return self.start
        if step <= self.n:
            return self.codes
        if step == self.n + 1:
            return self.stop
        return self.end
