"""The engine driven from asyncio (the HTTP server), in one of two ways.

- `loop="inline"` (the default): the engine steps as a task on the server's own event loop, as vLLM's
  first async engine did. Between two steps the loop takes a few turns (`await asyncio.sleep(0)`,
  `TURNS_BETWEEN_STEPS`), so the answers of a step go out and new requests come in, then the next step
  runs. One thread runs Python; during a step the matrix work still spreads over every core through
  torch's thread pool.
- `loop="thread"`: the engine steps on a thread of its own while the event loop serves HTTP. Both
  threads run Python, so they take turns at the interpreter lock: each torch call of the step
  releases it and must take it back. On this project's 2-core machine the inline loop gave 1.2x the
  output tokens/s over HTTP (benchmarks/serve_profile.md §12); the thread keeps the event loop
  answering during a step, so time to first token is lower, and matters when steps are long.

Either way one place owns the engine and the model: new requests, aborts and calls arrive through an
inbox and are taken between steps, and each request's outputs go to its asyncio queue. Anything else
that needs the model (a full-ranking forward pass, say) is sent as a call and runs between steps, so
nothing touches the model concurrently.
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


LOOPS = ("inline", "thread")

# Turns of the event loop between two inline steps. A request's way in (the connection's data, then the
# ASGI task, then the handler that hands it to the engine) and a first token's way out (the handler's
# queue, then the streaming response's tasks) are each a chain of callbacks that schedule one another,
# one link per turn; with one turn between steps every link waited for a whole step. Four turns let
# those chains finish within one gap, and a turn with nothing to do costs microseconds against a step of
# milliseconds (benchmarks/serve_profile.md §13: mixed-length TTFT at concurrency 16, median 71 -> 40 ms).
TURNS_BETWEEN_STEPS = 4


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 256, metrics: EngineMetrics | None = None,
                 loop: str = "inline"):
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
        self.engine = engine
        self.mode = loop
        self.max_waiting = max_waiting
        self.metrics = metrics
        self._inbox: queue.Queue = queue.Queue()
        self._sinks: dict[str, Callable] = {}
        self._pending = 0  # requests sent but not yet taken by the engine
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._recent: deque[tuple[float, int]] = deque()  # (time, generated tokens) for tokens/s
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task | None = None  # inline: started by the first request, on its event loop
        self._wake: asyncio.Event | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        if loop == "thread":
            self._thread = threading.Thread(target=self._loop, name="recfm-engine", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        if self.error is not None or self._stop.is_set():
            return False
        if self._thread is not None:
            return self._thread.is_alive()
        return self._task is None or not self._task.done()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=10)
        elif self._aloop is not None and not self._aloop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self._aloop:  # on the engine's own loop (the server's lifespan): end the task now
                self._task.cancel()
                return
            try:
                self._aloop.call_soon_threadsafe(self._poke)
            except RuntimeError:  # the loop is already closed
                pass

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- inline: a task on the event loop ---------------------------------------------------------

    def _ensure_task(self) -> None:
        if self.mode != "inline" or self._task is not None:
            return
        self._aloop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._aloop.create_task(self._run_inline(), name="recfm-engine")

    async def _run_inline(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                await self._take_inbox_inline()
                if eng.has_unfinished():
                    self._step()
                    if self.metrics is not None:
                        self.metrics.update(self)
                    for _ in range(TURNS_BETWEEN_STEPS):  # the step's answers go out, new requests come in
                        await asyncio.sleep(0)
                else:
                    if self.metrics is not None:
                        self.metrics.update(self)
                    self._wake.clear()
                    if self._inbox.empty():
                        await self._wake.wait()
        except BaseException as e:
            self._fail(e)
            if isinstance(e, asyncio.CancelledError):
                raise

    async def _take_inbox_inline(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg is None:
                continue
            if msg[0] == "call":  # model work outside a step (semantic-id scoring, say) goes to a worker thread, so the
                # loop keeps answering HTTP meanwhile; the engine waits for it, so the model is still used by one
                await asyncio.to_thread(self._handle, msg)
            else:
                self._handle(msg)

    def _step(self) -> None:
        eng = self.engine
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

    def _fail(self, e: BaseException) -> None:
        """The engine is broken: fail every open request, report dead."""
        self.error = e
        if not isinstance(e, asyncio.CancelledError):
            traceback.print_exc()
        for sink in list(self._sinks.values()):
            sink(EngineDead(f"the engine stopped: {e!r}"))
        self._sinks.clear()

    # --- thread: a thread of its own ----------------------------------------------------------------

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
                    self._step()
                if self.metrics is not None:
                    self.metrics.update(self)
        except BaseException as e:
            self._fail(e)

    def _deliver(self, batch: list) -> None:
        """Hand a step's outputs over: one wake-up of each event loop per step, not one per request (and
        straight into the queues when the engine steps on that loop)."""
        by_loop: dict = {}
        for sink, out in batch:
            loop = getattr(sink, "loop", None)
            if loop is None:
                sink(out)
            else:
                by_loop.setdefault(loop, []).append((sink.queue, out))
        for loop, items in by_loop.items():
            if loop is self._aloop:
                _put_all(items)
            else:
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
        self._ensure_task()
        self._poke()
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
                self._poke()

    async def call(self, fn: Callable[[Engine], object]):
        """Run fn(engine) where the engine runs, between steps."""
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
        self._ensure_task()
        self._poke()
        return await fut
