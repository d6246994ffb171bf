"""Prometheus metrics of one engine (prometheus_client, its own registry per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class EngineMetrics:
    def __init__(self, model_id: str):
        self.registry = r = CollectorRegistry()
        labels = ["model"]
        self.running = Gauge("recfm_requests_running", "Sequences being computed", labels, registry=r)
        self.waiting = Gauge("recfm_requests_waiting", "Sequences waiting to be scheduled", labels, registry=r)
        self.kv_used = Gauge("recfm_kv_blocks_used", "KV-cache blocks held by sequences or cached prefixes", labels, registry=r)
        self.kv_free = Gauge("recfm_kv_blocks_free", "KV-cache blocks free (cached prefixes included)", labels, registry=r)
        self.kv_total = Gauge("recfm_kv_blocks_total", "KV-cache blocks in the pool", labels, registry=r)
        self.hit_rate = Gauge("recfm_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up", labels, registry=r)
        self.tps = Gauge("recfm_generation_tokens_per_second", "Generated tokens per second over the last 10 s", labels, registry=r)
        self.prompt_tokens = Counter("recfm_prompt_tokens", "Prompt tokens computed", labels, registry=r)
        self.generation_tokens = Counter("recfm_generation_tokens", "Tokens generated", labels, registry=r)
        self.preemptions = Counter("recfm_preemptions", "Sequences preempted for lack of KV blocks", labels, registry=r)
        self.image_cache_hits = Counter("recfm_image_cache_hits", "Images found in the image-embedding cache", labels, registry=r)
        self.ttft = Histogram("recfm_time_to_first_token_seconds", "Time to first token", labels, buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("recfm_time_per_output_token_seconds", "Time per output token after the first", labels,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.model = model_id
        for metric in (self.running, self.waiting, self.kv_used, self.kv_free, self.kv_total, self.hit_rate, self.tps,
                       self.prompt_tokens, self.generation_tokens, self.preemptions, self.image_cache_hits, self.ttft, self.tpot):
            metric.labels(model_id)  # present (at zero) before the first request
        self._seen = dict(prompt=0, gen=0, pre=0, img=0)

    def update(self, async_engine) -> None:
        """Called on the engine thread after each loop turn."""
        eng, m = async_engine.engine, self.model
        s = eng.stats
        self.running.labels(m).set(len(eng.scheduler.running))
        self.waiting.labels(m).set(async_engine.num_waiting)
        self.kv_used.labels(m).set(eng.blocks.num_used)
        self.kv_free.labels(m).set(eng.blocks.num_free)
        self.kv_total.labels(m).set(eng.blocks.num_blocks)
        self.hit_rate.labels(m).set(eng.blocks.hit_rate)
        self.tps.labels(m).set(async_engine.tokens_per_second())
        for key, value, counter in (("prompt", s.prompt_tokens, self.prompt_tokens), ("gen", s.generation_tokens, self.generation_tokens),
                                    ("pre", eng.scheduler.num_preemptions, self.preemptions),
                                    ("img", eng.runner.image_hits, self.image_cache_hits)):
            if value > self._seen[key]:
                counter.labels(m).inc(value - self._seen[key])
                self._seen[key] = value
        while s.ttft:
            self.ttft.labels(m).observe(s.ttft.pop())
        while s.tpot:
            self.tpot.labels(m).observe(s.tpot.pop())

    def render(self) -> bytes:
        return generate_latest(self.registry)
