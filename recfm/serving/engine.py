"""The engine: requests in, tokens out, one `step()` at a time.

    add_request -> Scheduler (what runs this step) -> ModelRunner (one forward pass over the paged
    cache) -> sampler (one token per finished chunk) -> stop checks, detokenization -> outputs

`Engine` is synchronous and single-threaded; `recfm.serving.async_engine.AsyncEngine` drives it for
the HTTP server, as a task on the server's event loop (or on a thread of its own). A request with
n > 1 computes its prompt once: when the prompt is done the sequence forks, the children share its
full blocks and copy the last partial one.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover
    DecodeStream = None

from ..foundation.modeling import token_image_index
from .kv_cache import BlockManager, KVCache, kv_spec
from .runner import ModelRunner
from .sampler import Sampled, sample
from .scheduler import Scheduler, SchedulerConfig
from .sequence import ParamError, Prompt, Request, SamplingParams, Sequence, Status


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: from kv_cache_bytes
    kv_cache_bytes: int = 512 * 2**20
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    chunked_prefill: bool = True
    prefix_caching: bool = True
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    fast_decoder: bool = True  # the decoder as plain tensor code (decoder.py) where the architecture allows
    native_attention: bool = True  # decode attention by the compiled kernel (native.py) where it builds; else SDPA


@dataclass
class SeqOutput:
    index: int
    token_ids: list[int]  # new this step
    text: str  # new text this step
    logprobs: list[Sampled]  # new this step, when asked for
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[SeqOutput]
    prompt_tokens: int
    cached_tokens: int
    finished: bool
    completion_tokens: int = 0
    result: object = None  # a scoring request's answer


@dataclass
class Stats:
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    # recent latencies, drained by whoever reports them (the server's /metrics); bounded for callers that never do
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    tpot: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        tc = model.config.text_config
        self.max_model_len = config.max_model_len or tc.max_position_embeddings
        num_blocks = config.num_blocks
        if num_blocks is None:
            num_blocks = max(2, config.kv_cache_bytes // KVCache.block_bytes(kv_spec(model), config.block_size))
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.runner = ModelRunner(model, num_blocks, config.block_size, fast=config.fast_decoder,
                                  native_attention=config.native_attention)
        if self.runner.fast is not None:  # every batch shape set up before the first request (see decoder.py)
            self.runner.fast.warm(config.max_num_batched_tokens)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.chunked_prefill), self.blocks, self._block_keys)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        end = tokenizer.convert_tokens_to_ids("<|end|>")
        self.eos_ids = {i for i in (model.config.eos_token_id, end) if isinstance(i, int) and i >= 0}
        self.stats = Stats()
        # special tokens that stand for nothing in text; item and image-code tokens stay visible
        self._hidden_ids = set(tokenizer.all_special_ids) - set(tokenizer.convert_tokens_to_ids(
            [t for t in tokenizer.all_special_tokens if t.startswith("<item_") or t.startswith("<img_")]))
        self._rust_tokenizer = getattr(tokenizer, "backend_tokenizer", None) if DecodeStream is not None else None

    # --- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams, scorer=None) -> Request:
        """Queue a request. With `scorer`, nothing is generated: when the prompt is computed,
        scorer(last hidden state, next-token logits) is the request's `result` (full-ranking
        recommendation through the engine: batched with other requests, prefix cache included)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        n = len(prompt.token_ids)
        if n == 0:
            raise ParamError("prompt", "the prompt is empty")
        vocab = self.model.config.text_config.vocab_size
        bad = [t for t in prompt.token_ids if not 0 <= t < vocab]
        if bad:
            raise ParamError("prompt", f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if n >= self.max_model_len:
            raise ParamError("messages", f"the prompt has {n} tokens; this model's context is {self.max_model_len} "
                             "tokens and the answer needs at least one")
        if -(-(n + 1) // self.blocks.block_size) > self.blocks.num_blocks:
            raise ParamError("messages", f"the prompt has {n} tokens, more than the whole KV cache holds "
                             f"({self.blocks.num_blocks * self.blocks.block_size})")
        req = Request(request_id, prompt, params, scorer=scorer)
        for pos, key, _ in prompt.images:
            for p in range(pos, pos + self.model.config.image_tokens):
                req.extra_keys[p] = key
        if self.model.config.fusion == "cross_attention" and prompt.images:
            # every token of an item span attends to its image: the image is part of those tokens' keys
            req.token_image = token_image_index(torch.tensor([prompt.token_ids]), self.model.config)[0]
            for p, k in enumerate(req.token_image.tolist()):
                if k >= 0:
                    req.extra_keys[p] = prompt.images[k][1]
        for pos, idx in prompt.content:
            req.extra_keys[pos] = ("item", idx)
        seq = Sequence(next(self._seq_ids), req, 0, list(prompt.token_ids), n, generator=self._generator(params, 0))
        req.sequences.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        return req

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        req.aborted = True
        for seq in req.sequences:
            if seq.status is not Status.FINISHED:
                seq.finish_reason = "abort"
                self.scheduler.remove(seq)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @staticmethod
    def _generator(params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        return torch.Generator().manual_seed(params.seed + index)

    def _block_keys(self, seq: Sequence, n_blocks: int) -> list:
        """Prefix-cache keys of the first `n_blocks` full blocks of `seq`. A key chains the previous
        block's key, the block's tokens and what its image/item positions stand for. Blocks inside the
        prompt are the same for all of a request's answers and are computed once per request."""
        req, bs = seq.request, self.blocks.block_size
        prompt_blocks = seq.prompt_len // bs

        def extend(keys: list, upto: int, parent) -> None:
            for i in range(len(keys) if keys is req.block_keys else prompt_blocks + len(keys), upto):
                lo, hi = i * bs, (i + 1) * bs
                extra = tuple((p - lo, req.extra_keys[p]) for p in range(lo, hi) if p in req.extra_keys)
                parent = hash((parent, tuple(seq.tokens[lo:hi]), extra))
                keys.append(parent)

        shared = req.block_keys
        extend(shared, min(n_blocks, prompt_blocks), shared[-1] if shared else None)
        if n_blocks <= prompt_blocks:
            return shared[:n_blocks]
        own = seq.own_keys
        extend(own, n_blocks, own[-1] if own else (shared[-1] if shared else None))
        return shared + own[: n_blocks - prompt_blocks]

    # --- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        touched: dict[str, Request] = {}
        for seq in sched.out_of_memory:
            self._finish(seq, "length")
            touched[seq.request.request_id] = seq.request
        if not sched:
            return [self._output(r) for r in touched.values()]
        for seq, _ in sched.chunks:
            self.runner.prepare(seq.request)
        seqs, hidden, logits = self.runner.execute(sched.chunks)
        self.stats.steps += 1
        for seq, n in sched.chunks:
            seq.num_computed += n
            if seq.num_computed <= seq.prompt_len:
                self.stats.prompt_tokens += n
            self._register_full_blocks(seq)
        # n > 1: a prompt just finished forks into its n answers, each sampled from the same logits
        rows, sampled_seqs = [], []
        for k, seq in enumerate(seqs):
            req = seq.request
            if req.scorer is not None:  # a scoring request: its answer is a function of the last hidden state
                req.result = req.scorer(hidden[k], logits[k])
                if req.first_token_time is None:
                    req.first_token_time = time.monotonic()
                self._finish(seq, "stop", flush=False)
                touched[req.request_id] = req
                continue
            rows.append(k)
            sampled_seqs.append(seq)
            if seq.index == 0 and not seq.output and req.params.n > 1 and len(req.sequences) == 1:
                for i in range(1, req.params.n):
                    child = self._fork(seq, i)
                    rows.append(k)
                    sampled_seqs.append(child)
        if sampled_seqs:
            picks = sample(logits[rows], sampled_seqs)
            now = time.monotonic()
            for seq, s in zip(sampled_seqs, picks):
                req = seq.request
                if req.first_token_time is None:
                    req.first_token_time = now
                    self.stats.ttft.append(now - req.arrival)
                seq.tokens.append(s.token)
                self.stats.generation_tokens += 1
                if req.params.logprobs is not None:
                    seq.logprobs.append(s)
                self._check_stop(seq, s.token)
                touched[req.request_id] = req
        return [self._output(r) for r in touched.values()]

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        req = parent.request
        child = Sequence(next(self._seq_ids), req, index, list(parent.tokens), parent.prompt_len,
                         generator=self._generator(req.params, index), forked=True)
        bs = self.blocks.block_size
        full = parent.num_computed // bs
        child.block_table = self.blocks.share(parent.block_table[:full])
        if parent.num_computed % bs:
            b = self.blocks.allocate() if self.blocks.num_free else None
            if b is None:  # no room to copy the partial block: this answer recomputes its prompt later
                self.blocks.release(child.block_table)
                req.sequences.append(child)
                self.scheduler.add(child)
                return child
            self.runner.cache.copy_block(parent.block_table[full], b, parent.num_computed % bs)
            child.block_table.append(b)
        child.num_computed = parent.num_computed
        child.num_registered = parent.num_registered
        req.sequences.append(child)
        self.scheduler.add_running(child)
        return child

    def _register_full_blocks(self, seq: Sequence) -> None:
        full = seq.num_computed // self.blocks.block_size
        if full <= seq.num_registered:
            return
        keys = self._block_keys(seq, full)
        for i in range(seq.num_registered, full):
            self.blocks.register(seq.block_table[i], keys[i])
        seq.num_registered = full

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.request.params
        out = seq.output
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            self._finish(seq, "stop")
            return
        if token not in self._hidden_ids:
            seq.visible.append(token)
            seq.text += self._detokenize_step(seq)
        if p.stop:
            cut = min((i for i in (seq.text.find(s, max(0, seq.sent - len(s))) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = seq.text[:cut]
                self._finish(seq, "stop", flush=False)
                return
        if len(out) >= p.max_tokens or len(seq.tokens) >= self.max_model_len:
            self._finish(seq, "length")

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t not in self._hidden_ids], skip_special_tokens=False)

    def _detokenize_step(self, seq: Sequence, final: bool = False) -> str:
        """The text the newest visible token adds. Through tokenizers' `DecodeStream` (incremental
        decoding in Rust, one call per token) when the tokenizer has a Rust backend; otherwise by
        decoding a short window (prefix_offset..) twice, as a whole-output decode per token would cost
        O(length) each time. A character split over tokens is held back until complete; `final`
        flushes what is still held back (as replacement characters if it never completed)."""
        ids = seq.visible
        if self._rust_tokenizer is not None and not final:
            if seq.decode_stream is None:
                seq.decode_stream = DecodeStream(skip_special_tokens=False)
            piece = seq.decode_stream.step(self._rust_tokenizer, ids[-1])
            if piece is None:
                return ""
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return piece
        if final and seq.read_offset >= len(ids):
            return ""
        before = self.tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=False)
        now = self.tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=False)
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return now[len(before) :]
        return ""

    def _finish(self, seq: Sequence, reason: str, flush: bool = True) -> None:
        if flush:
            seq.text += self._detokenize_step(seq, final=True)  # whatever was held back
        seq.finish_reason = reason
        req = seq.request
        if len(seq.output) > 1:
            self.stats.tpot.append((time.monotonic() - req.first_token_time) / (len(seq.output) - 1))
        self.scheduler.remove(seq)

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        finished = req.finished and (len(req.sequences) == req.params.n or req.aborted)
        for seq in req.sequences:
            hold = 0
            if seq.finish_reason is None and req.params.stop:
                hold = max(len(s) for s in req.params.stop) - 1  # could be the start of a stop string
            upto = max(seq.sent, len(seq.text) - hold)
            text = seq.text[seq.sent : upto]
            seq.sent += len(text)
            before, seq.num_emitted = seq.num_emitted, len(seq.output)
            new_tokens = seq.output[before:]
            new_lp = seq.logprobs[before:]
            outs.append(SeqOutput(seq.index, new_tokens, text, new_lp, seq.finish_reason))
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, outs, req.sequences[0].prompt_len, req.num_cached_tokens, finished,
                             sum(len(s.output) for s in req.sequences), req.result)

    # --- convenience ----------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams]) -> list[list[list[int]]]:
        """Run prompts to completion; per prompt, the output token ids of each of its n answers."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{next(self._seq_ids)}" for _ in prompts]
        for rid, p, sp in zip(ids, prompts, params):
            self.add_request(rid, p, sp)
        results: dict[str, dict[int, list[int]]] = {rid: {} for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                for o in out.outputs:
                    results[out.request_id].setdefault(o.index, []).extend(o.token_ids)
        return [[r[i] for i in sorted(r)] for r in (results[rid] for rid in ids)]

