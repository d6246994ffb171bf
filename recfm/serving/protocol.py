"""Request bodies of the HTTP API (pydantic). Unknown fields are accepted and ignored, as OpenAI
clients send fields a server may not know; recfm's own extensions (top_k, repetition_penalty,
ignore_eos, stop_token_ids, allowed_items, exclude_seen, constrain) ride in the same body, which is
where the `openai` client's `extra_body` puts them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    allowed_items: list[str] | None = None
    exclude_seen: bool = False
    constrain: Literal["item", "image"] | None = None
    # an answer constrained to one item is fused with the identifier view of the items the messages mention
    # (atomic ids; None: the model's own id_view_weight; 0: the prompt alone)
    id_view_weight: float | None = Field(default=None, ge=0)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class HistoryEntry(_Body):
    item_id: str
    rating: float | None = None


class RecommendationRequest(_Body):
    model: str | None = None
    history: list[str | HistoryEntry] = Field(min_length=1)
    k: int = Field(default=10, ge=1, le=1000)
    exclude_seen: bool = True
    allowed_items: list[str] | None = None
    template: str = "next-1"
    # the identifier view's weight in the template's ranking (None: the model's own id_view_weight; 0: the prompt alone)
    id_view_weight: float | None = Field(default=None, ge=0)


class ImageRequest(_Body):
    model: str | None = None
    history: list[str | HistoryEntry] = Field(min_length=1)
    prompt: str | None = None  # what to draw ("a red lamp"); without it, any item this user would like
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    temperature: float = Field(default=1.0, ge=0, le=100)
    top_k: int | None = Field(default=None, ge=0)
    response_format: Literal["b64_json"] = "b64_json"
    size: str | None = None
