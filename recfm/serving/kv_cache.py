"""The paged KV cache: preallocated fixed-size blocks, per-sequence block tables, reference counts,
and prefix caching.

Every layer's keys and values live in one tensor of `num_blocks * block_size` slots; a sequence owns
a list of block numbers (its block table) and its token at position p sits in slot
`table[p // block_size] * block_size + p % block_size`.

Prefix caching: once a block is full its key is (key of the previous block, its tokens, the images
and content items its tokens stand for) and it is registered under that key. A new sequence whose
first blocks have registered keys takes those blocks (reference count + 1) instead of computing
them. A block whose count falls to zero goes to the back of the free queue but keeps its key, so it
can still be hit until it is reused; allocation takes from the front (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch


class NoFreeBlocks(RuntimeError):
    pass


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero tensor. On CPU it comes from calloc (numpy), whose pages the OS zeroes on first touch:
    a large pool costs no start-up time and no resident memory until blocks are used, where
    torch.zeros writes every page up front. Zeros, not garbage: masked-out padding is still
    multiplied by zero attention weights, and 0 x NaN would be NaN."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    raw = torch.from_numpy(np.zeros((*shape[:-1], shape[-1] * dtype.itemsize), dtype=np.uint8))
    return raw.view(dtype)


def kv_spec(model) -> dict:
    """The KV cache a RecFM model needs: layers, kv heads, head size, and the dtype/device of its
    activations (read from a norm, which no quantization option touches)."""
    tc = model.config.text_config
    norm = model.model.language_model.norm.weight
    return {"num_layers": tc.num_hidden_layers, "kv_heads": tc.num_key_value_heads,
            "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
            "dtype": norm.dtype, "device": norm.device}


class KVCache:
    """Per-layer key and value tensors of (num_blocks, block_size, kv_heads, head_dim)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.block_size = block_size

    @staticmethod
    def block_bytes(spec: dict, block_size: int) -> int:
        """Bytes of one block over every layer, keys and values (`spec` from `kv_spec`)."""
        return 2 * spec["num_layers"] * block_size * spec["kv_heads"] * spec["head_dim"] * spec["dtype"].itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def copy_block(self, src: int, dst: int, n_tokens: int) -> None:
        for t in self.k + self.v:
            t[dst, :n_tokens] = t[src, :n_tokens]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be at least 1")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.key_of: list[Hashable | None] = [None] * num_blocks
        self.cached: dict[Hashable, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hits = 0  # prompt tokens found in the cache
        self.queries = 0  # prompt tokens looked up

    # --- accounting -----------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, n_tokens: int, table_len: int) -> int:
        return max(0, -(-n_tokens // self.block_size) - table_len)

    # --- allocation -----------------------------------------------------------------------------

    def allocate(self) -> int:
        if not self.free:
            raise NoFreeBlocks("no free KV blocks")
        b, _ = self.free.popitem(last=False)
        key = self.key_of[b]
        if key is not None:  # evict its cached contents
            if self.cached.get(key) == b:
                del self.cached[key]
            self.key_of[b] = None
        self.ref[b] = 1
        return b

    def grow(self, table: list[int], n_tokens: int) -> bool:
        """Append blocks to `table` until it holds `n_tokens` tokens; False (and nothing taken) if there
        are not enough free blocks."""
        need = self.blocks_needed(n_tokens, len(table))
        if need > len(self.free):
            return False
        table.extend(self.allocate() for _ in range(need))
        return True

    def release(self, table: list[int]) -> None:
        """Drop a sequence's hold on its blocks (tail first, so its last blocks are evicted first)."""
        for b in reversed(table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.key_of[b] is None or not self.prefix_caching:
                    self.key_of[b] = None
                    self.free[b] = None
                    self.free.move_to_end(b, last=False)  # nothing worth keeping: reuse these first
                else:
                    self.free[b] = None
            elif self.ref[b] < 0:
                raise AssertionError(f"block {b} released more often than taken")
        table.clear()

    def share(self, table: list[int]) -> list[int]:
        """A copy of `table` whose blocks are held once more (a forked sequence)."""
        for b in table:
            self.ref[b] += 1
        return list(table)

    # --- prefix caching -------------------------------------------------------------------------

    def match(self, keys: list[Hashable], max_blocks: int) -> list[int]:
        """Take the cached blocks for the longest run of `keys` (at most `max_blocks`)."""
        self.queries += max_blocks * self.block_size
        if not self.prefix_caching:
            return []
        found = []
        for key in keys[:max_blocks]:
            b = self.cached.get(key)
            if b is None:
                break
            found.append(b)
        for b in found:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        self.hits += len(found) * self.block_size
        return found

    def register(self, block: int, key: Hashable) -> None:
        """A full block's contents are final: make them findable under `key`."""
        if not self.prefix_caching or self.key_of[block] is not None:
            return
        if key not in self.cached:
            self.cached[key] = block
            self.key_of[block] = key

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
