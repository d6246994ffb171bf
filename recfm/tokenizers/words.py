"""Items as bags of words: what the item encoder reads in `item_text: words` mode, and what the
content-profile baseline compares.

A word is a lower-cased `\\w+` run of an item's title and text. The vocabulary keeps the words that
`min_df` or more of the training items share. A word only one or two items have works as a second
identifier: training learns which of those items were answers and pushes the rest down. An item new to
the model has no trained vector for its own rare words, so its group ranked below every warm item
(MovieLens cold items, `recommend_ml-100k_cold_words.md`). Words many items share are trained
through all of them, so a new item is read from the same words as the warm ones.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

WORD = re.compile(r"\w+")


def item_words(text: str | None) -> set[str]:
    """The distinct lower-cased words of a text."""
    return set(WORD.findall((text or "").lower()))


@dataclass(frozen=True)
class WordVocabulary:
    """Words with their inverse document frequency over the items it was built from."""

    words: tuple[str, ...]
    idf: tuple[float, ...]

    def __post_init__(self):
        if len(self.words) != len(self.idf):
            raise ValueError(f"{len(self.words)} words but {len(self.idf)} idf values")
        object.__setattr__(self, "_index", {w: k for k, w in enumerate(self.words)})

    @classmethod
    def from_texts(cls, texts: Iterable[str | None], min_df: int) -> WordVocabulary:
        """The words that `min_df` or more of the texts contain, most frequent first (ties by spelling),
        idf = log(n_texts / document frequency)."""
        if min_df < 1:
            raise ValueError(f"min_df must be at least 1, got {min_df}")
        bags = [item_words(t) for t in texts]
        df = Counter(w for b in bags for w in b)
        kept = sorted((w for w, n in df.items() if n >= min_df), key=lambda w: (-df[w], w))
        return cls(tuple(kept), tuple(math.log(len(bags) / df[w]) for w in kept))

    def __len__(self) -> int:
        return len(self.words)

    def extend(self, other: WordVocabulary) -> WordVocabulary:
        """Fine-tuning on a new domain: this vocabulary's words first, at their ids, then `other`'s words
        it lacks, in `other`'s order. A word `other` has takes `other`'s idf (the statistics of the
        items being read now); the rest keep this one's."""
        words = (*self.words, *(w for w in other.words if w not in self._index))
        return WordVocabulary(words, tuple(other.idf[other._index[w]] if w in other._index else self.idf[k]
                                           for k, w in enumerate(words)))

    def encode(self, text: str | None, max_words: int) -> tuple[list[int], list[float]]:
        """A text's words in the vocabulary as (ids, weights): TF-IDF with binary term frequency,
        L2-normalised, the `max_words` heaviest kept (ties by vocabulary order)."""
        ids = sorted((self._index[w] for w in item_words(text) if w in self._index), key=lambda k: (-self.idf[k], k))
        ids = ids[:max_words]
        norm = math.sqrt(sum(self.idf[k] ** 2 for k in ids))
        return ids, [self.idf[k] / norm if norm > 0 else 0.0 for k in ids]
