"""Item identifiers: how an item appears in the token stream. Three modes, one interface.

- `atomic`: one new token per item, `<item_{k}>` for the item with index k. Simple and exact, but
  the vocabulary grows with the catalogue and a new item has an untrained token.
- `semantic`: a short code per item from residual k-means of its content embedding, one vocabulary
  per level (`<s0_12><s1_3><s2_7>`), plus a collision level (`<s3_0>`) that makes every code unique.
  Similar items share prefixes, so the model can generalise across them; generation is constrained
  by a prefix trie so that only real items come out; a new item gets a code from its content.
- `content`: the item is one placeholder token `<item>` whose embedding the model computes from the
  item's own image and text; the serializer records which item fills each placeholder (`index`).
  New items need no new vocabulary. Predicting an item goes through the model's full-ranking head,
  which scores every item: `decode` here takes that head's item index, not token ids.

Life cycle: build from the item ids in index order (the caller takes this order from training data
only, so no identifier leaks the split; nothing here reorders items), add `new_tokens()` to the text
tokenizer, `bind(tokenizer)` to learn their ids, then `encode` / `decode` / `trie`. Token ids
belong to the text tokenizer and are not saved: bind again after `from_pretrained` and after
`add_items` returned new tokens.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .trie import PrefixTrie

FORMAT_VERSION = 1
CONFIG_NAME = "item_tokenizer.json"  # names start with "item_" so they can share a checkpoint folder
IDS_NAME = "item_ids.json"
CODES_NAME = "item_codes.npy"
CENTROIDS_NAME = "item_centroids.npy"


class ItemTokenizer:
    """Maps item ids to token sequences and back. Subclasses define the codes; this class does
    everything that only needs "item i is the token sequence codes[i] over new_tokens()"."""

    mode: ClassVar[str] = ""

    def __init__(self, item_ids: Sequence[str]):
        self.item_ids: list[str] = []
        self._index: dict[str, int] = {}
        self._extend(list(item_ids))
        self._vocab_ids: np.ndarray | None = None  # id of each of new_tokens(), once bound
        self._ids: np.ndarray | None = None  # (n_items, L) token ids, cached
        self._trie: PrefixTrie | None = None

    # --- what a mode defines -------------------------------------------------------------------

    def new_tokens(self) -> list[str]:
        """The tokens to add to the text tokenizer (in this order; the model resizes embeddings)."""
        raise NotImplementedError

    def tokens(self, item_id: str) -> list[str]:
        """The tokens that stand for `item_id` in a prompt or a target."""
        raise NotImplementedError

    def _codes(self) -> np.ndarray:
        """(n_items, L) int array: each item's tokens as positions in `new_tokens()`."""
        raise NotImplementedError

    def _add(self, new_item_ids: list[str], embeddings: np.ndarray | None) -> list[str]:
        """Give codes to new items (appended after the existing ones); return new tokens."""
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        return {}

    def _save_arrays(self, path: Path) -> None:
        pass

    @classmethod
    def _load(cls, path: Path, config: dict[str, Any], item_ids: list[str]) -> ItemTokenizer:
        return cls(item_ids)

    # --- shared ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.item_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_items={len(self)}, bound={self.is_bound})"

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index

    def index(self, item_id: str) -> int:
        """The item's index (its row in every per-item array of the model and the data)."""
        try:
            return self._index[item_id]
        except KeyError:
            raise KeyError(f"unknown item {item_id!r}; new items go through add_items()") from None

    def item_id(self, index: int) -> str:
        return self.item_ids[index]

    @property
    def is_bound(self) -> bool:
        return self._vocab_ids is not None

    @property
    def vocab_ids(self) -> np.ndarray:
        """Token ids of `new_tokens()`, in that order (e.g. to initialise their embeddings)."""
        if self._vocab_ids is None:
            raise RuntimeError(
                "item tokens are not bound to token ids: add new_tokens() to the text tokenizer, "
                "then call bind(tokenizer)"
            )
        return self._vocab_ids

    def bind(self, tokenizer: Any) -> ItemTokenizer:
        """Learn the ids the text tokenizer gave our tokens; returns self.

        `tokenizer` is a Hugging Face tokenizer (anything with `convert_tokens_to_ids`) or a
        function from token string to id. Raises if a token is missing (the tokenizer answers
        with its unknown-token id, None, or a negative id) or two tokens share an id, because
        either would make items indistinguishable without any error later.
        """
        vocab = self.new_tokens()
        if hasattr(tokenizer, "convert_tokens_to_ids"):
            ids = tokenizer.convert_tokens_to_ids(vocab)
            unk = getattr(tokenizer, "unk_token_id", None)
        elif callable(tokenizer):
            ids, unk = [tokenizer(t) for t in vocab], None
        else:
            raise TypeError(f"bind() needs a tokenizer or a str -> int function, got {type(tokenizer)}")
        missing = [t for t, i in zip(vocab, ids) if i is None or i < 0 or (unk is not None and i == unk)]
        if missing:
            raise ValueError(
                f"{len(missing)} item token(s) are not in the tokenizer's vocabulary (e.g. {missing[:3]}); "
                "add them first: tokenizer.add_tokens(item_tokenizer.new_tokens(), special_tokens=True)"
            )
        ids = np.asarray(ids, dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("two item tokens map to the same token id")
        self._vocab_ids, self._ids, self._trie = ids, None, None
        return self

    @property
    def id_table(self) -> np.ndarray:
        """(n_items, L) token ids of every item's code (row i is `encode(item_ids[i])`)."""
        if self._ids is None:
            self._ids = self.vocab_ids[self._codes()]
        return self._ids

    def encode(self, item_id: str) -> list[int]:
        return self.id_table[self.index(item_id)].tolist()

    def decode(self, ids: Sequence[int]) -> str | None:
        """The item whose code is exactly `ids` (end tokens stripped), or None if there is none."""
        i = self.trie.lookup([int(t) for t in ids])
        return None if i is None else self.item_ids[i]

    @property
    def trie(self) -> PrefixTrie:
        """A trie over every item's token ids, for constrained decoding (rebuilt after changes)."""
        if self._trie is None:
            self._trie = PrefixTrie(self.id_table)
        return self._trie

    def add_items(self, new_item_ids: Sequence[str], embeddings: np.ndarray | None = None) -> list[str]:
        """Append new items after the existing ones; existing items keep their index and code.

        Returns the tokens that the text tokenizer must add (atomic: one per item; semantic: new
        collision tokens, usually none; content: none). If any are returned the tokenizer is
        unbound until `bind` is called again with the grown text tokenizer.
        """
        new_item_ids = list(new_item_ids)
        self._new_index(new_item_ids)  # check before a mode computes anything
        added = self._add(new_item_ids, embeddings)
        self._extend(new_item_ids)
        self._ids, self._trie = None, None
        if added:
            self._vocab_ids = None
        return added

    def _extend(self, item_ids: Sequence[str]) -> None:
        """Append items, after checking all of them, so an error leaves the tokenizer unchanged."""
        self._index.update(self._new_index(item_ids))
        self.item_ids.extend(item_ids)

    def _new_index(self, item_ids: Sequence[str]) -> dict[str, int]:
        bad = [i for i in item_ids if not isinstance(i, str)]
        if bad:
            raise TypeError(f"item ids must be strings, got {bad[0]!r} ({type(bad[0]).__name__})")
        index = {item_id: len(self.item_ids) + k for k, item_id in enumerate(item_ids)}
        if len(index) != len(item_ids):
            dup = next(i for i, count in Counter(item_ids).items() if count > 1)
            raise ValueError(f"duplicate item id {dup!r}")
        clash = [i for i in item_ids if i in self._index]
        if clash:
            raise ValueError(f"{len(clash)} item(s) already exist, e.g. {clash[:3]}")
        return index

    # --- persistence -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `item_tokenizer.json` (version, mode, settings), `item_ids.json` and .npy arrays."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        config = {"version": FORMAT_VERSION, "mode": self.mode, "n_items": len(self), **self._config()}
        (path / IDS_NAME).write_text(json.dumps(self.item_ids, ensure_ascii=False))
        self._save_arrays(path)
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")  # last: marks it complete

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ItemTokenizer:
        """Load any mode (on `ItemTokenizer`) or check that the saved mode is this class's."""
        path = Path(directory)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
        config = json.loads((path / CONFIG_NAME).read_text())
        if config.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path / CONFIG_NAME}: unsupported version {config.get('version')!r}")
        mode = config.get("mode")
        if mode not in MODES:
            raise ValueError(f"{path / CONFIG_NAME}: unknown mode {mode!r} (known: {sorted(MODES)})")
        klass = MODES[mode]
        if cls is not ItemTokenizer and klass is not cls:
            raise ValueError(f"{path} holds a {mode!r} item tokenizer, not {cls.__name__}")
        item_ids = json.loads((path / IDS_NAME).read_text())
        if len(item_ids) != config["n_items"]:
            raise ValueError(f"{path / IDS_NAME}: {len(item_ids)} ids, config says {config['n_items']}")
        return klass._load(path, config, item_ids)


class AtomicItemTokenizer(ItemTokenizer):
    """One token per item: `<item_{k}>` for the item with index k."""

    mode = "atomic"

    def new_tokens(self) -> list[str]:
        return [f"<item_{k}>" for k in range(len(self))]

    def tokens(self, item_id: str) -> list[str]:
        return [f"<item_{self.index(item_id)}>"]

    def _codes(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)[:, None]

    def _add(self, new_item_ids: list[str], embeddings: np.ndarray | None) -> list[str]:
        return [f"<item_{k}>" for k in range(len(self), len(self) + len(new_item_ids))]


class ContentItemTokenizer(ItemTokenizer):
    """Every item is the placeholder token; the model computes its embedding from image and text.

    `encode(item_id)` is `[placeholder_id]` for every item and `index(item_id)` says which item it
    is. `decode` takes what the full-ranking head produces, `[item_index]`, and returns that item
    (None if out of range). `trie` allows exactly the placeholder, so generic constrained decoding
    emits `<item>` and then the end token; the ranking head scores the position.
    """

    mode = "content"

    def __init__(self, item_ids: Sequence[str], placeholder: str = "<item>"):
        super().__init__(item_ids)
        self.placeholder = placeholder

    @property
    def placeholder_id(self) -> int:
        return int(self.vocab_ids[0])

    def new_tokens(self) -> list[str]:
        return [self.placeholder]

    def tokens(self, item_id: str) -> list[str]:
        self.index(item_id)  # unknown items are an error in every mode
        return [self.placeholder]

    def _codes(self) -> np.ndarray:
        return np.zeros((len(self), 1), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str | None:
        """`ids` is `[item_index]` from the full-ranking head (not token ids); None if invalid."""
        ids = [int(t) for t in ids]
        if len(ids) != 1 or not 0 <= ids[0] < len(self):
            return None
        return self.item_ids[ids[0]]

    @property
    def trie(self) -> PrefixTrie:
        if self._trie is None:
            self._trie = PrefixTrie([[self.placeholder_id]])
        return self._trie

    def _add(self, new_item_ids: list[str], embeddings: np.ndarray | None) -> list[str]:
        return []

    def _config(self) -> dict[str, Any]:
        return {"placeholder": self.placeholder}

    @classmethod
    def _load(cls, path: Path, config: dict[str, Any], item_ids: list[str]) -> ItemTokenizer:
        return cls(item_ids, placeholder=config["placeholder"])


class SemanticItemTokenizer(ItemTokenizer):
    """Semantic ids from residual k-means, plus a collision level that makes codes unique.

    `codes` is (n_items, levels + 1): a centroid index per level, then the collision index (the
    item's rank, in index order, among items with the same centroid path). `centroids` is
    (levels, codebook_size, d) and is kept so that new items can be coded after a reload.
    Build one from embeddings with `fit`; the constructor only takes a finished state.
    """

    mode = "semantic"

    def __init__(
        self,
        item_ids: Sequence[str],
        codes: np.ndarray,
        centroids: np.ndarray,
        fit_config: dict[str, Any] | None = None,
    ):
        super().__init__(item_ids)
        self.codes = np.asarray(codes, dtype=np.int64)
        self.centroids = np.asarray(centroids, dtype=np.float32)
        self.fit_config = dict(fit_config or {})
        levels, k, _ = self.centroids.shape
        if self.codes.shape != (len(self), levels + 1):
            raise ValueError(f"codes have shape {self.codes.shape}, expected {(len(self), levels + 1)}")
        if len(self) and (self.codes[:, :levels].max() >= k or self.codes.min() < 0):
            raise ValueError("codes out of the codebook's range")

    @classmethod
    def fit(
        cls,
        item_ids: Sequence[str],
        embeddings: np.ndarray,
        *,
        levels: int = 3,
        codebook_size: int | None = None,
        seed: int = 0,
        iters: int = 25,
    ) -> SemanticItemTokenizer:
        """Residual k-means on `embeddings` (n_items, d), row i being item i.

        Level l clusters what levels < l left unexplained, so the first token is the coarsest
        description of an item. `codebook_size` defaults to `default_codebook_size`; it is capped
        at n_items. Deterministic for a given seed (on a given machine and BLAS).
        """
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        x = _check_embeddings(embeddings, len(item_ids))
        k = min(codebook_size or default_codebook_size(len(item_ids), levels), max(len(item_ids), 1))
        centroids = np.zeros((levels, k, x.shape[1]), dtype=np.float32)
        codes = np.zeros((len(item_ids), levels + 1), dtype=np.int64)
        resid = x.copy()
        for level in range(levels):
            centroids[level], codes[:, level] = kmeans(resid, k, seed=seed + level, iters=iters)
            resid -= centroids[level][codes[:, level]]
        codes[:, levels] = _collision_index(codes[:, :levels])
        config = {"seed": seed, "iters": iters}
        return cls(item_ids, codes, centroids, fit_config=config)

    @property
    def levels(self) -> int:
        return self.centroids.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.centroids.shape[1]

    @property
    def collision_size(self) -> int:
        """Tokens in the collision level: the most items that share one centroid path."""
        return int(self.codes[:, -1].max()) + 1 if len(self) else 1

    def _token(self, level: int, code: int) -> str:
        return f"<s{level}_{code}>"

    def new_tokens(self) -> list[str]:
        k, levels = self.codebook_size, self.levels
        return [self._token(lv, c) for lv in range(levels) for c in range(k)] + [
            self._token(levels, c) for c in range(self.collision_size)
        ]

    def tokens(self, item_id: str) -> list[str]:
        return [self._token(lv, int(c)) for lv, c in enumerate(self.codes[self.index(item_id)])]

    def _codes(self) -> np.ndarray:
        return self.codes + np.arange(self.levels + 1) * self.codebook_size  # level blocks in order

    def quantize(self, embeddings: np.ndarray) -> np.ndarray:
        """(m, levels) centroid path of each row: the nearest centroid per level, on residuals."""
        resid = _check_embeddings(embeddings, None, d=self.centroids.shape[2]).copy()
        out = np.zeros((len(resid), self.levels), dtype=np.int64)
        for level, c in enumerate(self.centroids):
            out[:, level] = _nearest(resid, c)[0]
            resid -= c[out[:, level]]
        return out

    def _add(self, new_item_ids: list[str], embeddings: np.ndarray | None) -> list[str]:
        if embeddings is None:
            raise ValueError("semantic ids need the new items' content embeddings")
        old = self.collision_size
        prefixes = np.concatenate([self.codes[:, : self.levels], self.quantize(embeddings)])
        if len(prefixes) != len(self) + len(new_item_ids):
            raise ValueError(f"got {len(prefixes) - len(self)} embeddings for {len(new_item_ids)} items")
        # Ranks in index order: existing items keep theirs, new ones take the next free index.
        collision = _collision_index(prefixes)
        assert (collision[: len(self)] == self.codes[:, -1]).all()
        self.codes = np.concatenate([prefixes, collision[:, None]], axis=1)
        return [self._token(self.levels, c) for c in range(old, self.collision_size)]

    def usage(self) -> dict[str, Any]:
        """How well the codebooks are used: codes in use and perplexity per level, collisions.

        A perplexity far below the codebook size means a few centroids take most items (long,
        uninformative shared prefixes and many collisions).
        """
        per_level, perplexity = [], []
        for level in range(self.levels):
            counts = np.bincount(self.codes[:, level], minlength=self.codebook_size)
            p = counts[counts > 0] / max(len(self), 1)
            per_level.append(int((counts > 0).sum()))
            perplexity.append(float(np.exp(-(p * np.log(p)).sum())))
        return {
            "n_items": len(self),
            "levels": self.levels,
            "codebook_size": self.codebook_size,
            "codes_used": per_level,
            "usage": [u / self.codebook_size for u in per_level],
            "perplexity": perplexity,
            "distinct_paths": int((self.codes[:, -1] == 0).sum()),
            "items_with_collision": int((self.codes[:, -1] > 0).sum()),
            "collision_size": self.collision_size,
        }

    def _config(self) -> dict[str, Any]:
        return {"levels": self.levels, "codebook_size": self.codebook_size, "fit": self.fit_config}

    def _save_arrays(self, path: Path) -> None:
        np.save(path / CODES_NAME, self.codes, allow_pickle=False)
        np.save(path / CENTROIDS_NAME, self.centroids, allow_pickle=False)

    @classmethod
    def _load(cls, path: Path, config: dict[str, Any], item_ids: list[str]) -> ItemTokenizer:
        codes = np.load(path / CODES_NAME, allow_pickle=False)
        centroids = np.load(path / CENTROIDS_NAME, allow_pickle=False)
        return cls(item_ids, codes, centroids, fit_config=config.get("fit"))


MODES: dict[str, type[ItemTokenizer]] = {
    "atomic": AtomicItemTokenizer,
    "semantic": SemanticItemTokenizer,
    "content": ContentItemTokenizer,
}


def build_item_tokenizer(
    item_ids: Sequence[str], mode: str, embeddings: np.ndarray | None = None, **options: Any
) -> ItemTokenizer:
    """The item tokenizer for `mode`; `embeddings` (n_items, d) is needed by semantic ids only.

    `options` go to the mode: `placeholder` for content; `levels`, `codebook_size`, `seed`,
    `iters` for semantic.
    """
    if mode == "atomic":
        return AtomicItemTokenizer(item_ids, **options)
    if mode == "content":
        return ContentItemTokenizer(item_ids, **options)
    if mode == "semantic":
        if embeddings is None:
            raise ValueError("semantic item ids need content embeddings of the items")
        return SemanticItemTokenizer.fit(item_ids, embeddings, **options)
    raise ValueError(f"unknown item id mode {mode!r} (known: {sorted(MODES)})")


def default_codebook_size(n_items: int, levels: int) -> int:
    """A power of two near n_items ** (1 / levels), between 32 and 256: large enough that the
    levels can tell most items apart, small enough that every code is seen often in training."""
    k = 2 ** math.ceil(math.log2(max(n_items, 2) ** (1 / levels)))
    return int(min(max(k, 32), 256))


# --- k-means -----------------------------------------------------------------------------------


def kmeans(
    x: np.ndarray, k: int, *, seed: int = 0, iters: int = 25, init_sample: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding: (centroids (k, d) float32, assignment (n,) int64).

    Seeding runs on at most `init_sample * k` points (seeding is O(n k d) and a sample gives as
    good a start); Lloyd's steps use all points and stop when no assignment changes. An empty
    cluster is moved to the point farthest from its centroid. The returned assignment is the
    nearest centroid under the returned centroids, so it agrees with quantizing later.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    rng = np.random.default_rng(seed)
    sample = x if n <= init_sample * k else x[np.sort(rng.choice(n, init_sample * k, replace=False))]
    c = _kmeans_pp(sample, k, rng)
    assign = None
    for _ in range(iters):
        new_assign, d2 = _nearest(x, c)
        if assign is not None and (new_assign == assign).all():
            break
        assign = new_assign
        counts = np.bincount(assign, minlength=k)
        c = (_cluster_sums(x, assign, k) / np.maximum(counts, 1)[:, None]).astype(np.float32)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            far = np.argsort(-d2, kind="stable")[: len(empty)]
            c[empty[: len(far)]] = x[far]
    return c, _nearest(x, c)[0]


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++: each next centre drawn with probability proportional to squared distance."""
    n = len(x)
    chosen = [int(rng.integers(n))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(axis=1, dtype=np.float64)
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:
            j = min(int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right")), n - 1)
        else:  # fewer distinct points than centres: duplicates are harmless, ties go to the first
            j = int(rng.integers(n))
        chosen.append(j)
        d2 = np.minimum(d2, ((x - x[j]) ** 2).sum(axis=1, dtype=np.float64))
    return x[chosen].copy()


def _nearest(x: np.ndarray, c: np.ndarray, chunk: int = 1 << 15) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest row of `c` for each row of `x`, and the squared distance to it."""
    c2 = (c * c).sum(axis=1)
    assign = np.empty(len(x), dtype=np.int64)
    d2 = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), chunk):  # chunks keep the (n, k) distance matrix small
        xc = x[s : s + chunk]
        d = c2 - 2 * (xc @ c.T)  # |x|^2 is the same for every centre, so it is added after
        a = d.argmin(axis=1)
        assign[s : s + chunk] = a
        d2[s : s + chunk] = np.maximum(d[np.arange(len(a)), a] + (xc * xc).sum(axis=1), 0)
    return assign, d2


def _cluster_sums(x: np.ndarray, assign: np.ndarray, k: int, chunk: int = 1 << 15) -> np.ndarray:
    """Sum of the rows of `x` in each cluster, in float64, without copying all of `x`."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    for s in range(0, len(x), chunk):
        a = assign[s : s + chunk]
        order = np.argsort(a, kind="stable")
        a_sorted = a[order]
        starts = np.flatnonzero(np.r_[True, a_sorted[1:] != a_sorted[:-1]])
        sums[a_sorted[starts]] += np.add.reduceat(x[s : s + chunk][order].astype(np.float64), starts)
    return sums


def _collision_index(prefixes: np.ndarray) -> np.ndarray:
    """For each row, how many earlier rows have the same prefix (0, 1, 2, ... in row order)."""
    n = len(prefixes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(prefixes.T[::-1])  # lexsort is stable: equal rows stay in row order
    s = prefixes[order]
    new_group = np.r_[True, (s[1:] != s[:-1]).any(axis=1)]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    return rank


def _check_embeddings(embeddings: np.ndarray, n: int | None, d: int | None = None) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or (n is not None and len(x) != n) or (d is not None and x.shape[1] != d):
        want = f"({n if n is not None else 'n'}, {d if d is not None else 'd'})"
        raise ValueError(f"embeddings have shape {x.shape}, expected {want}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    return x
