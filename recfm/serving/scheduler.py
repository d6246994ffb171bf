"""Iteration-level scheduling (continuous batching).

Each step the scheduler picks what the model runs next, under a token budget and a sequence limit:

1. running sequences that are decoding (one token each), oldest first: decodes go first so a new
   prompt never stalls answers already streaming;
2. running sequences still in their prompt, one chunk each (chunked prefill: a long prompt is
   split over steps, and other sequences keep decoding in between);
3. waiting sequences, first come first served, while the budget and the KV pool allow; a newly
   admitted prompt first takes whatever the prefix cache holds of it.

When a running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are released and it returns to the front of the queue with its prompt and output so far,
to be recomputed later (its output is unchanged: the tokens it already produced are part of what is
recomputed).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager
from .sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    chunked_prefill: bool = True


@dataclass
class Scheduled:
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    preempted: list[Sequence] = field(default_factory=list)
    out_of_memory: list[Sequence] = field(default_factory=list)  # alone and still no room: cannot go on

    def __bool__(self) -> bool:
        return bool(self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, block_keys):
        self.config, self.blocks = config, blocks
        self.block_keys = block_keys  # (sequence, n_blocks) -> keys of its first n full blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sequence that already holds its blocks."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Finished or aborted: out of the queues, every block returned."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.status = Status.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, out: Scheduled) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_computed = 0
        seq.num_registered = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self) -> Scheduled:
        cfg, bm = self.config, self.blocks
        out = Scheduled()
        budget = cfg.max_num_batched_tokens
        taken: dict[Sequence, int] = {}
        order = [s for s in self.running if s.remaining == 1] + [s for s in self.running if s.remaining > 1]
        for seq in order:
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this step
                continue
            n = min(seq.remaining, budget)
            if n < seq.remaining and not cfg.chunked_prefill:
                continue
            while not bm.grow(seq.block_table, seq.num_computed + n):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    out.out_of_memory.append(seq)
                    break
                if victim in taken:
                    budget += taken.pop(victim)
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                taken[seq] = n
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.block_table:
                max_blocks = (len(seq.tokens) - 1) // bm.block_size  # the last token is always computed
                seq.block_table = bm.match(self.block_keys(seq, max_blocks), max_blocks)
                seq.num_computed = len(seq.block_table) * bm.block_size
                seq.num_registered = len(seq.block_table)
                if seq.output == [] and not seq.forked:
                    seq.request.num_cached_tokens = seq.num_computed
            n = min(seq.remaining, budget)
            if n < seq.remaining and not cfg.chunked_prefill:
                break
            if not bm.grow(seq.block_table, seq.num_computed + n):
                bm.release(seq.block_table)  # hold no cache hits while waiting: running sequences may need them
                seq.num_computed = seq.num_registered = 0
                if not self.running:  # nothing to wait for: it will never fit
                    self.waiting.popleft()
                    out.out_of_memory.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            taken[seq] = n
            budget -= n
        out.chunks = list(taken.items())
        return out
