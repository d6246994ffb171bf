"""The engine on a background thread, for asyncio callers (the HTTP server).

One thread owns the engine and the model: it takes new requests, aborts and calls from an inbox
between steps, runs `step()` while there is work, and hands each request's outputs to its asyncio
queue. Anything else that needs the model (a full-ranking forward pass, say) is sent as a call and
runs on the same thread between steps, so nothing touches the model concurrently.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable

from .engine import Engine, RequestOutput
from .metrics import EngineMetrics


class _Sink:
    """Where one request's outputs go: an asyncio queue on its event loop."""

    def __init__(self, loop, queue):
        self.loop, self.queue = loop, queue

    def __call__(self, out) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)


def _put_all(items) -> None:
    for q, out in items:
        q.put_nowait(out)


class QueueFull(RuntimeError):
    pass


class EngineDead(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 256, metrics: EngineMetrics | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self._inbox: queue.Queue = queue.Queue()
        self._sinks: dict[str, Callable] = {}
        self._pending = 0  # requests sent but not yet taken by the engine thread
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._recent: deque[tuple[float, int]] = deque()  # (time, generated tokens) for tokens/s
        self._thread = threading.Thread(target=self._loop, name="recfm-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    # --- the engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                idle = not eng.has_unfinished()
                try:
                    msg = self._inbox.get(timeout=0.5) if idle else self._inbox.get_nowait()
                except queue.Empty:
                    msg = None
                while msg is not None:
                    self._handle(msg)
                    try:
                        msg = self._inbox.get_nowait()
                    except queue.Empty:
                        msg = None
                if eng.has_unfinished():
                    before = eng.stats.generation_tokens
                    outs = eng.step()
                    self._recent.append((time.monotonic(), eng.stats.generation_tokens - before))
                    batch = []
                    for out in outs:
                        sink = self._sinks.get(out.request_id)
                        if sink is not None:
                            batch.append((sink, out))
                            if out.finished:
                                self._sinks.pop(out.request_id, None)
                    self._deliver(batch)
                if self.metrics is not None:
                    self.metrics.update(self)
        except BaseException as e:  # the engine is broken: fail every open request, report dead
            self.error = e
            traceback.print_exc()
            for sink in list(self._sinks.values()):
                sink(EngineDead(f"the engine stopped: {e!r}"))
            self._sinks.clear()

    @staticmethod
    def _deliver(batch: list) -> None:
        """Hand a step's outputs over: one wake-up of each event loop per step, not one per request."""
        by_loop: dict = {}
        for sink, out in batch:
            loop = getattr(sink, "loop", None)
            if loop is None:
                sink(out)
            else:
                by_loop.setdefault(loop, []).append((sink.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _handle(self, msg) -> None:
        kind = msg[0]
        if kind == "add":
            _, rid, prompt, params, scorer, sink = msg
            with self._lock:
                self._pending -= 1
            try:
                self.engine.add_request(rid, prompt, params, scorer)
            except Exception as e:  # a bad request: its caller gets the error, the engine goes on
                sink(e)
                return
            self._sinks[rid] = sink
        elif kind == "abort":
            self.engine.abort(msg[1])
            self._sinks.pop(msg[1], None)
        elif kind == "call":
            _, fn, sink = msg
            try:
                sink(fn(self.engine))
            except Exception as e:
                sink(e)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - window:
            self._recent.popleft()
        if not self._recent:
            return 0.0
        span = max(now - self._recent[0][0], 1e-3)
        return sum(n for _, n in self._recent) / span

    # --- asyncio side ---------------------------------------------------------------------------

    def _check(self) -> None:
        if not self.alive:
            raise EngineDead("the engine is not running")

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._pending

    async def generate(self, request_id: str, prompt, params, scorer=None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; leaving early (a client that went away) aborts it."""
        self._check()
        if self.num_waiting >= self.max_waiting:
            raise QueueFull(f"{self.num_waiting} requests are already waiting")
        q: asyncio.Queue = asyncio.Queue()
        sink = _Sink(asyncio.get_running_loop(), q)
        with self._lock:
            self._pending += 1
        self._inbox.put(("add", request_id, prompt, params, scorer, sink))
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._inbox.put(("abort", request_id))

    async def call(self, fn: Callable[[Engine], object]):
        """Run fn(engine) on the engine thread, between steps."""
        self._check()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def sink(result):
            def put():
                if fut.done():
                    return
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
            loop.call_soon_threadsafe(put)

        self._inbox.put(("call", fn, sink))
        return await fut
