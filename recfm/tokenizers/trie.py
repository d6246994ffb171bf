"""A prefix trie over item codes, for constrained decoding: only real items can come out.

Every item's identifier is a short sequence of token ids (one token for atomic ids, a few for
semantic ids). Beam search asks, at each step, "which tokens may follow what I have generated so
far?"; the trie answers with a sorted array of ids, and everything else gets -inf.

The trie is stored as flat arrays rather than nested dicts, because a catalogue can have a million
items and a dict per node would cost gigabytes and minutes of Python. Nodes are numbered breadth
first in lexicographic order, so the children of a node are one contiguous, sorted slice:

    token[v]            the token on the edge into node v (the root, node 0, has none)
    ptr[v]:ptr[v + 1]   the node ids of v's children; token[ptr[v]:ptr[v + 1]] is sorted
    item[v]             the index of the sequence that ends at v, or -1

Building is a lexicographic sort plus one vectorised pass per depth; a step is at most a handful of
`searchsorted` calls on small slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch
from transformers import LogitsProcessor

_EMPTY = np.zeros(0, dtype=np.int64)
_EMPTY.flags.writeable = False


class PrefixTrie:
    """All items' code sequences; answers allowed-next-token and complete-sequence queries.

    `sequences` is an int array of shape (n, L) (fixed-length codes, the fast path) or a list of
    sequences of possibly different lengths. Row i is sequence i: `lookup` returns that index.
    The set must be prefix-free (no code is a prefix of another, no duplicates); otherwise a
    decoder could not tell whether to stop, so building raises ValueError.
    """

    def __init__(self, sequences: np.ndarray | Sequence[Sequence[int]]):
        codes, lengths = _as_padded(sequences)
        n, max_len = codes.shape
        self.n_sequences = n
        self.max_len = max_len
        if n == 0:
            self.token = np.zeros(1, dtype=np.int64)
            self.ptr = np.ones(2, dtype=np.int64)
            self.item = np.full(1, -1, dtype=np.int64)
            return

        # lexsort sorts by the last key first, so pass the columns reversed; padding (-1) sorts a
        # shorter sequence before the longer ones that extend it, which is what the check needs.
        order = np.lexsort(codes.T[::-1])
        codes, lengths = codes[order], lengths[order]
        # first_diff[i]: first column where sorted row i differs from row i - 1 (max_len: equal).
        differs = codes[1:] != codes[:-1]
        first_diff = np.where(differs.any(axis=1), differs.argmax(axis=1), max_len)
        bad = np.flatnonzero(first_diff >= lengths[:-1])
        if len(bad):
            a, b = order[bad[0]], order[bad[0] + 1]
            raise ValueError(
                f"sequence {a} {codes[bad[0], :lengths[bad[0]]].tolist()} is equal to or a prefix of "
                f"sequence {b}; item codes must be unique and prefix-free"
            )
        first_diff = np.concatenate([[-1], first_diff])  # row 0 starts a node at every depth

        tokens, parents, items = [], [], []
        node_of_row = np.zeros(n, dtype=np.int64)  # the depth-(d-1) node of each row; root at d=1
        n_nodes = 1
        for d in range(1, max_len + 1):
            has = lengths >= d
            starts = has & (first_diff < d)  # row i opens a new depth-d node
            rank = np.cumsum(starts) - 1
            new_node_of_row = np.where(has, n_nodes + rank, -1)
            tokens.append(codes[starts, d - 1])
            parents.append(node_of_row[starts])
            ends = lengths == d
            item_d = np.full(int(starts.sum()), -1, dtype=np.int64)
            item_d[rank[ends]] = order[ends]
            items.append(item_d)
            n_nodes += len(item_d)
            node_of_row = new_node_of_row

        self.token = np.concatenate([[0], *tokens]).astype(np.int64)
        counts = np.bincount(np.concatenate(parents), minlength=n_nodes)
        # children of v are numbered right after those of v - 1, starting at node 1
        self.ptr = np.concatenate([[1], 1 + np.cumsum(counts)]).astype(np.int64)
        self.item = np.concatenate([[-1], *items]).astype(np.int64)
        for a in (self.token, self.ptr, self.item):
            a.flags.writeable = False  # allowed() hands out views; nobody may write through them

    def __len__(self) -> int:
        return self.n_sequences

    @property
    def n_nodes(self) -> int:
        return len(self.token)

    @property
    def nbytes(self) -> int:
        return self.token.nbytes + self.ptr.nbytes + self.item.nbytes

    def node(self, prefix: Sequence[int]) -> int | None:
        """The node reached by following `prefix` from the root, or None if no code starts so."""
        v = 0
        token, ptr = self.token, self.ptr
        for t in prefix:  # a plain loop: at most L steps, each one searchsorted on a small slice
            lo = ptr[v]
            kids = token[lo : ptr[v + 1]]
            j = kids.searchsorted(t)
            if j == len(kids) or kids[j] != t:
                return None
            v = lo + j
        return int(v)

    def allowed(self, prefix: Sequence[int]) -> np.ndarray:
        """Sorted token ids that may follow `prefix`; empty if `prefix` is complete or invalid.

        The result is a read-only view into the trie: no copy, so a step costs microseconds.
        """
        v = self.node(prefix)
        if v is None:
            return _EMPTY
        return self.token[self.ptr[v] : self.ptr[v + 1]]

    def lookup(self, seq: Sequence[int]) -> int | None:
        """Index of the sequence equal to `seq`, or None (unknown, or only a prefix of one)."""
        v = self.node(seq)
        if v is None:
            return None
        i = int(self.item[v])
        return None if i < 0 else i

    def is_complete(self, prefix: Sequence[int]) -> bool:
        """True when `prefix` is a whole code, so the only thing left to generate is the end."""
        return self.lookup(prefix) is not None


def _as_padded(sequences: np.ndarray | Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(codes padded with -1 to the longest length, lengths) as int64 arrays."""
    if isinstance(sequences, (np.ndarray, torch.Tensor)):
        codes = np.asarray(sequences, dtype=np.int64)
        if codes.ndim != 2:
            raise ValueError(f"expected an (n_items, L) array of codes, got shape {codes.shape}")
        lengths = np.full(len(codes), codes.shape[1], dtype=np.int64)
        negative = codes.size > 0 and codes.min() < 0
    else:
        seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        codes = np.full((len(seqs), int(lengths.max(initial=0))), -1, dtype=np.int64)
        for i, s in enumerate(seqs):
            codes[i, : len(s)] = s
        negative = any(len(s) and s.min() < 0 for s in seqs)
    if negative:
        raise ValueError("token ids must be non-negative")
    if (lengths == 0).any():
        raise ValueError("empty code sequence; every item needs at least one token")
    return codes, lengths


def _allowed_or_end(trie: PrefixTrie, generated: Sequence[int], end: np.ndarray) -> np.ndarray:
    """What the decoder may emit next: the trie's children, or only the end token.

    The end token is the answer once the code is complete, and also for a prefix that is already
    off the trie (a row that has finished and is being padded, or an unconstrained prefix forced
    into the span): it ends the row quickly, and a row is never left with every token at -inf,
    which would turn beam scores into NaN.
    """
    nxt = trie.allowed(generated)
    return nxt if len(nxt) else end


class TrieLogitsProcessor(LogitsProcessor):
    """Sets every token the trie does not allow to -inf, row by row.

    `span_start` is the column of `input_ids` where the item code begins. For a left-padded batch
    whose prompts end right before the item, that is the prompt length `input_ids.shape[1]` passed
    to `generate`; pass less if the prompt already holds the first tokens of the code. Tokens
    from `span_start` on are the prefix the trie is asked about, so the processor works the same
    for greedy, sampling and beam search (any number of rows). When the code is complete only
    `end_token_id` (e.g. the eos id) is allowed.
    """

    def __init__(self, trie: PrefixTrie, span_start: int, end_token_id: int):
        self.trie = trie
        self.span_start = span_start
        self.end_token_id = end_token_id
        self._end = np.array([end_token_id], dtype=np.int64)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.span_start :].tolist()
        allowed = [_allowed_or_end(self.trie, g, self._end) for g in generated]
        rows = np.repeat(np.arange(len(allowed)), [len(a) for a in allowed])
        rows = torch.from_numpy(rows).to(scores.device)
        cols = torch.from_numpy(np.concatenate(allowed)).to(scores.device)
        out = torch.full_like(scores, -float("inf"))  # one pass over the vocabulary, then a gather
        out[rows, cols] = scores[rows, cols]
        return out


def prefix_allowed_tokens_fn(
    trie: PrefixTrie, span_start: int, end_token_id: int
) -> Callable[[int, torch.Tensor], list[int]]:
    """A function for `model.generate(prefix_allowed_tokens_fn=...)`, same rules as the processor.

    transformers calls it once per row with that row's whole `input_ids`; `span_start` means what
    it means for `TrieLogitsProcessor`.
    """

    end = np.array([end_token_id], dtype=np.int64)

    def fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        return _allowed_or_end(trie, input_ids[span_start:].tolist(), end).tolist()

    return fn
