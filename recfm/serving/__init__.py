"""The serving engine (scheduler, paged KV cache, prefix cache, sampler, model runner), quantized loading and the HTTP API server."""
