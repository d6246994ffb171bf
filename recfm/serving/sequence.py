"""What the engine tracks: sampling parameters, prompts, requests and their sequences."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None = off; k >= 0 = the chosen token's logprob and the top k
    constraint: Any = None  # a recfm.serving.constraints.Constraint: which tokens may come next
    skip_special_tokens: bool = True

    def __post_init__(self):
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 = off)"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (1 <= self.n <= 64, "n", "must be between 1 and 64"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be between 0 and 20"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ParamError(name, f"{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class ParamError(ValueError):
    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class Prompt:
    """Token ids plus what some positions stand for.

    images: (start position, key, uint8 pixels (3, S, S) or None when the key is already cached);
    each image covers `image_tokens` positions from its start. content: (position, item index) of
    content-mode <item> placeholders.
    """

    token_ids: list[int]
    images: list[tuple[int, str, torch.Tensor | None]] = field(default_factory=list)
    content: list[tuple[int, int]] = field(default_factory=list)


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    scorer: Any = None  # see Engine.add_request
    result: Any = None
    arrival: float = field(default_factory=time.monotonic)
    # filled by the model runner on first schedule
    embeds: Any = None
    # block keys of the prompt's full blocks (prefix caching)
    block_keys: list = field(default_factory=list)
    extra_keys: dict[int, Any] = field(default_factory=dict)  # position -> what else its block key must hold
    token_image: Any = None  # cross-attention: (prompt_len,) tensor, the image each prompt token attends to, or -1
    sequences: list[Sequence] = field(default_factory=list)
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.sequences)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n answers
    tokens: list[int]  # prompt, then output
    prompt_len: int
    generator: torch.Generator | None = None
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_registered: int = 0  # full blocks already offered to the prefix cache
    own_keys: list = field(default_factory=list)  # prefix-cache keys of its blocks past the prompt's
    num_emitted: int = 0  # output tokens already handed out
    text: str = ""  # detokenized output so far (stop strings cut)
    visible: list[int] = field(default_factory=list)  # output tokens that show in text
    prefix_offset: int = 0  # incremental detokenization window (see Engine._detokenize_step)
    read_offset: int = 0  # visible tokens whose text is in `text`
    decode_stream: object = None  # tokenizers' DecodeStream over `visible`, made on the first visible token
    sent: int = 0  # characters of `text` already handed out
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    forked: bool = False  # a child of a prompt already computed (n > 1)

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def remaining(self) -> int:
        """Tokens whose keys and values are not in the cache yet."""
        return len(self.tokens) - self.num_computed

    @property
    def is_prefill(self) -> bool:
        return self.remaining > 1
