"""The serving engine (scheduler, paged KV cache with prefix caching, model runner, sampler,
constraints) and the HTTP API server.

    from recfm.serving import Engine, EngineConfig, Prompt, SamplingParams, Service
"""

from .engine import Engine, EngineConfig, RequestOutput
from .sequence import Prompt, SamplingParams
from .service import Service

__all__ = ["Engine", "EngineConfig", "Prompt", "RequestOutput", "SamplingParams", "Service"]
