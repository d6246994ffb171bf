"""The sampler: one next token per sequence from the model's last-position logits.

Order, per row: repetition penalty (over prompt and output, as transformers applies it), the
constraint mask, log-probabilities (reported from these logits, before temperature), then greedy
argmax, or temperature, top-k, top-p and a draw from the sequence's own generator (seeded per
request, so a seeded answer does not depend on what else is in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sequence import Sequence


@dataclass
class Sampled:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token, logprob), best first


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[Sampled]:
    logits = logits.float()
    for b, seq in enumerate(seqs):
        p = seq.request.params
        if p.repetition_penalty != 1.0:
            seen = torch.as_tensor(sorted(set(seq.tokens)), dtype=torch.long)
            vals = logits[b, seen]
            logits[b, seen] = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
        if p.constraint is not None:
            allowed = torch.as_tensor(np.array(p.constraint.allowed(seq.output), dtype=np.int64))
            masked = torch.full_like(logits[b], float("-inf"))
            masked[allowed] = logits[b, allowed]
            logits[b] = masked
    want_lp = [s.request.params.logprobs is not None for s in seqs]
    logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
    greedy = torch.argmax(logits, dim=-1).tolist()
    out = []
    for b, seq in enumerate(seqs):
        p = seq.request.params
        tok = greedy[b] if p.greedy else _draw(logits[b], p, seq.generator)
        s = Sampled(tok)
        if want_lp[b]:
            lp = logprobs[b]
            s.logprob = float(lp[tok])
            if p.logprobs:
                v, i = torch.topk(lp, p.logprobs)
                s.top = list(zip(i.tolist(), v.tolist()))
            else:
                s.top = []
        out.append(s)
    return out


def _draw(row: torch.Tensor, p, generator: torch.Generator | None) -> int:
    row = row / p.temperature
    if p.top_k and p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cut = probs.cumsum(-1) - probs > p.top_p  # drop a token once the mass before it exceeds top_p
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
        row = torch.full_like(row, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(row, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
