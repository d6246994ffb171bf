"""The HTTP API (FastAPI): OpenAI-compatible routes and recommendation-native ones. It only
translates HTTP to engine requests and engine outputs to HTTP; prompts are built by `Service`.

Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`, 400 for anything wrong
with a request, 401 without the API key (when the server has one), 404 for an unknown model, 429
when the queue is full, 503 when the engine is down.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .async_engine import AsyncEngine, EngineDead, QueueFull
from .engine import RequestOutput
from .metrics import EngineMetrics
from .protocol import ChatRequest, CompletionRequest, ImageRequest, Message, RecommendationRequest
from .sequence import ParamError, Prompt, SamplingParams
from .service import BadInput, Service

DEFAULT_MAX_TOKENS = 512
ITEM_VIEWS = ("full", "history", "id", "image")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
                            status_code=self.status)


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_request")


class _APIKey:
    """'Authorization: Bearer KEY' on /v1/ routes. A plain ASGI middleware: it looks at a request once
    and then steps aside; starlette's BaseHTTPMiddleware (what `@app.middleware` builds) would pass
    every chunk of every streamed answer through a memory stream and a task group."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(header, self.expected):
                response = APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                    "authentication_error", code="invalid_api_key").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(service: Service, api_key: str | None = None, max_waiting: int = 256, engine_loop: str = "inline") -> FastAPI:
    """The app; `engine_loop` is where the engine steps (`AsyncEngine`'s `loop`: "inline" or "thread")."""
    metrics = EngineMetrics(service.model_id)
    engine = AsyncEngine(service.engine, max_waiting=max_waiting, metrics=metrics, loop=engine_loop)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        engine.shutdown()

    app = FastAPI(title="recfm", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.service = engine, service
    created = int(time.time())
    tok = service.tok.text

    # --- errors and auth ------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        return bad(f"{loc or 'body'}: {err.get('msg', 'invalid request')}", loc or None).response()

    if api_key:
        app.add_middleware(_APIKey, api_key=api_key)

    def check_model(name: str | None) -> None:
        if name and name != service.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {service.model_id!r}",
                           "not_found_error", "model", "model_not_found")

    # --- plain routes ---------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "dead"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": created,
                                            "owned_by": "recfm", "root": service.model_id, "parent": None,
                                            "max_model_len": service.engine.max_model_len}]}

    # --- helpers --------------------------------------------------------------------------------

    def convert(messages: list[Message]) -> tuple[list[dict], dict, list[str]]:
        out, images, mentioned = [], {}, []
        for k, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role
            content = m.content if m.content is not None else ""
            if isinstance(content, str):
                out.append({"role": role, "content": content})
                continue
            parts = []
            for j, p in enumerate(content):
                where = f"messages[{k}].content[{j}]"
                kind = p.get("type")
                if kind == "text":
                    if not isinstance(p.get("text"), str):
                        raise bad("a text part needs a string 'text'", where)
                    parts.append({"type": "text", "text": p["text"]})
                elif kind == "image_url":
                    spec = p.get("image_url")
                    url = spec.get("url") if isinstance(spec, dict) else spec
                    if not isinstance(url, str):
                        raise bad("an image_url part needs image_url.url", where)
                    key, px = service.image_pixels(url, where)
                    images[key] = px
                    parts.append({"type": "image", "image": key})
                elif kind == "item":
                    item_id = p.get("item_id")
                    if item_id is None:
                        raise bad("an item part needs 'item_id'", where)
                    service.check_item(str(item_id), where)
                    view = p.get("view", "full")
                    if view not in ITEM_VIEWS:
                        raise bad(f"item view must be one of {ITEM_VIEWS}, got {view!r}", where)
                    part = {"type": "item", "item_id": str(item_id), "view": view}
                    if p.get("rating") is not None:
                        part["rating"] = p["rating"]
                    parts.append(part)
                    mentioned.append(str(item_id))
                else:
                    raise bad(f"unknown content part type {kind!r}; use text, image_url or item", where)
            out.append({"role": role, "content": parts})
        return out, images, mentioned

    def sampling(body, prompt_len: int, logprobs: int | None) -> SamplingParams:
        room = service.engine.max_model_len - prompt_len
        if room < 1:
            raise bad(f"the prompt has {prompt_len} tokens; this model's context is {service.engine.max_model_len} tokens "
                      "and the answer needs at least one", "prompt")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or min(DEFAULT_MAX_TOKENS, room)
        if max_tokens > room:
            raise bad(f"max_tokens {max_tokens} + the prompt's {prompt_len} tokens exceed this model's context of "
                      f"{service.engine.max_model_len} tokens", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, body.top_k or 0), seed=body.seed,
                repetition_penalty=body.repetition_penalty or 1.0, stop=[s for s in stop if s],
                stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos, n=body.n,
                logprobs=logprobs, skip_special_tokens=body.skip_special_tokens)
        except ParamError as e:
            raise bad(str(e), e.param) from None

    async def outputs(rid: str, prompt, params, scorer=None) -> AsyncIterator[RequestOutput]:
        """One request's outputs; the engine's refusals become HTTP errors."""
        try:
            async for out in engine.generate(rid, prompt, params, scorer):
                yield out
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", "rate_limit_error", code="queue_full") from None
        except EngineDead as e:
            raise APIError(503, str(e), "server_error", code="engine_dead") from None
        except ParamError as e:
            raise bad(str(e), e.param) from None

    async def scores(prompt, scorer):
        """A ranking request's catalogue scores (its scorer's result), through the engine."""
        result = None
        async for out in outputs(f"rec-{uuid.uuid4().hex}", prompt, SamplingParams(max_tokens=1), scorer):
            result = out.result
        return result

    async def started(events: AsyncIterator) -> AsyncIterator:
        """Wait for the first event before answering, so that a request the engine refuses gets a status
        code instead of a stream that breaks; then every event, the first included."""
        try:
            head = await events.__anext__()
        except StopAsyncIteration:
            head = None

        async def chained():
            if head is not None:
                yield head
                async for x in events:
                    yield x

        return chained()

    async def collect(events: AsyncIterator) -> tuple[dict, dict]:
        """Without streaming: each answer's text, token ids, logprobs and finish reason, by (prompt k,
        answer index), and each prompt's last output (it carries the token counts)."""
        answers, last = {}, {}
        async for k, out in events:
            for o in out.outputs:
                a = answers.setdefault((k, o.index), {"text": "", "tokens": [], "logprobs": [], "reason": "length"})
                a["text"] += o.text
                a["tokens"] += o.token_ids
                a["logprobs"] += o.logprobs
                if o.finish_reason:
                    a["reason"] = o.finish_reason
            last[k] = out
        return answers, last

    async def tagged(events: AsyncIterator, k: int = 0) -> AsyncIterator:
        async for out in events:
            yield k, out

    EMPTY = {"text": "", "tokens": [], "logprobs": [], "reason": "length"}

    def token_entry(t: int, logprob: float) -> dict:
        text = tok.decode([t])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def chat_logprobs(lps) -> dict:
        return {"content": [{**token_entry(s.token, s.logprob), "top_logprobs": [token_entry(t, v) for t, v in (s.top or [])]}
                            for s in lps]}

    def completion_logprobs(lps) -> dict:
        texts = [tok.decode([s.token]) for s in lps]
        offsets = [0, *itertools.accumulate(len(t) for t in texts)][: len(texts)]
        return {"tokens": texts, "token_logprobs": [s.logprob for s in lps],
                "top_logprobs": [{tok.decode([t]): v for t, v in (s.top or [])} for s in lps], "text_offset": offsets}

    def usage(last: dict) -> dict:
        """Token counts summed over the outputs in `last` (one per prompt)."""
        prompt = sum(o.prompt_tokens for o in last.values())
        completion = sum(o.completion_tokens for o in last.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in last.values())}}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def until_disconnect(request: Request, events: AsyncIterator) -> AsyncIterator:
        """events, ending early when the client goes away. starlette cancels a streaming response on
        disconnect only if it finds the response's task waiting; a stream woken by every engine step at
        the same point of the loop's turn (the inline engine loop) is never found so, and would run to
        its end."""
        gone = asyncio.Event()

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            async for x in events:
                yield x
                if gone.is_set():
                    return
        finally:
            watcher.cancel()

    # --- chat -----------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        try:
            messages, images, mentioned = convert(body.messages)
            prompt, _ = service.prompt(messages, images)
            params = sampling(body, len(prompt.token_ids), (body.top_logprobs or 0) if body.logprobs else None)
            constrain = body.constrain or ("item" if body.allowed_items is not None or body.exclude_seen else None)
            view = None
            if constrain == "item":
                service.item_params(params, body.allowed_items, mentioned if body.exclude_seen else [])
                view = service.item_answer_view(mentioned, body.allowed_items, body.exclude_seen, body.id_view_weight)
            elif constrain == "image":
                service.image_params(params)
        except BadInput as e:
            raise bad(str(e), e.param) from None
        if view is not None:  # the identifier view first (one more engine request), then the fused answer
            request_view, to_bias = view
            params.constraint.first_bias = to_bias(await scores(*request_view))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        gen = outputs(rid, prompt, params)
        events = await started(gen)

        def extras(token_ids: list[int]) -> dict:
            if constrain != "item":
                return {}
            item = service.decode_item(token_ids)
            return {"items": [{"item_id": item, "title": service.catalogue[item].title if item in service.catalogue else None}]} \
                if item else {}

        if not body.stream:
            answers, last = await collect(tagged(events))
            choices = []
            for i in range(params.n):
                a = answers.get((0, i), EMPTY)
                choices.append({"index": i, "message": {"role": "assistant", "content": a["text"], **extras(a["tokens"])},
                                "logprobs": chat_logprobs(a["logprobs"]) if body.logprobs else None,
                                "finish_reason": a["reason"]})
            return {"id": rid, "object": "chat.completion", "created": now, "model": service.model_id, "choices": choices,
                    "usage": usage(last)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream():
            base = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": service.model_id}
            extra = {"usage": None} if include_usage else {}
            last, toks = {}, {i: [] for i in range(params.n)}
            live = until_disconnect(request, events)
            try:
                for i in range(params.n):
                    yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}], **extra})
                async for out in live:
                    for o in out.outputs:
                        if not o.token_ids and not o.finish_reason:
                            continue
                        toks[o.index] += o.token_ids
                        delta = {"content": o.text, **(extras(toks[o.index]) if o.finish_reason else {})}
                        choice = {"index": o.index, "delta": delta, "finish_reason": o.finish_reason,
                                  "logprobs": chat_logprobs(o.logprobs) if body.logprobs else None}
                        yield sse({**base, "choices": [choice], **extra})
                    last[0] = out
            finally:
                await live.aclose()
                await gen.aclose()  # a client gone mid-stream: the request is aborted and its blocks freed
            if include_usage and last:
                yield sse({**base, "choices": [], "usage": usage(last)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    # --- completions ----------------------------------------------------------------------------

    async def merged_outputs(rid: str, prompts: list, params: list) -> tuple[AsyncIterator, AsyncIterator]:
        """Several prompts' outputs as they come, as (prompt k, output): a task per prompt feeding one queue.
        Returns the merged generator (to close) and its events from the first on."""
        merged: asyncio.Queue = asyncio.Queue()

        async def run(k: int):
            try:
                async for out in outputs(f"{rid}-{k}", prompts[k], params[k]):
                    await merged.put((k, out))
            except APIError as e:
                await merged.put((k, e))
            finally:
                await merged.put((k, None))

        tasks = [asyncio.create_task(run(k)) for k in range(len(prompts))]

        async def interleaved():
            done = 0
            try:
                while done < len(prompts):
                    k, out = await merged.get()
                    if out is None:
                        done += 1
                        continue
                    if isinstance(out, APIError):
                        raise out
                    yield k, out
            finally:
                for t in tasks:
                    t.cancel()

        gen = interleaved()
        return gen, await started(gen)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        p = body.prompt
        batch = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        prompts = [Prompt(tok.encode(x) if isinstance(x, str) else list(x)) for x in batch]  # the engine checks the ids
        params = [sampling(body, len(pr.token_ids), body.logprobs) for pr in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        n = body.n
        if len(prompts) == 1:  # one prompt (the usual case): its outputs as they come, no merging task in between
            gen = outputs(f"{rid}-0", prompts[0], params[0])
            events = await started(tagged(gen))
        else:
            gen, events = await merged_outputs(rid, prompts, params)

        if not body.stream:
            answers, last = await collect(events)
            choices = []
            for i in range(len(prompts) * n):
                a = answers.get((i // n, i % n), EMPTY)
                echo = batch[i // n] if body.echo and isinstance(batch[i // n], str) else ""
                choices.append({"index": i, "text": echo + a["text"], "finish_reason": a["reason"],
                                "logprobs": completion_logprobs(a["logprobs"]) if body.logprobs is not None else None})
            return {"id": rid, "object": "text_completion", "created": now, "model": service.model_id, "choices": choices,
                    "usage": usage(last)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream():
            base = {"id": rid, "object": "text_completion", "created": now, "model": service.model_id}
            extra = {"usage": None} if include_usage else {}
            last = {}
            live = until_disconnect(request, events)
            try:
                async for k, out in live:
                    for o in out.outputs:
                        if not o.token_ids and not o.finish_reason:
                            continue
                        choice = {"index": k * n + o.index, "text": o.text, "finish_reason": o.finish_reason,
                                  "logprobs": completion_logprobs(o.logprobs) if body.logprobs is not None else None}
                        yield sse({**base, "choices": [choice], **extra})
                    last[k] = out
            finally:
                await live.aclose()
                await gen.aclose()
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage(last)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    # --- recommendation-native ------------------------------------------------------------------

    def history_of(entries) -> list:
        return [e if isinstance(e, str) else {"item_id": e.item_id, "rating": e.rating} for e in entries]

    @app.post("/v1/recommendations")
    async def recommendations(body: RecommendationRequest):
        check_model(body.model)
        history = history_of(body.history)
        try:
            if service.model.config.item_mode == "semantic":  # a pass over the code trie, between engine steps
                ranked = await engine.call(lambda _: service.recommend(history, body.k, body.exclude_seen,
                                                                       body.allowed_items, body.template))
            else:  # a forward pass through the engine per view (the prompt; the identifier view where it is fused):
                # batched with other requests, prefix cache included
                requests, finish = service.recommend_request(history, body.k, body.exclude_seen, body.allowed_items,
                                                             body.template, body.id_view_weight)
                ranked = finish(await asyncio.gather(*(scores(p, s) for p, s in requests)))
        except BadInput as e:
            raise bad(str(e), e.param) from None
        except EngineDead as e:
            raise APIError(503, str(e), "server_error", code="engine_dead") from None
        data = [{"rank": r + 1, "item_id": i, "title": service.catalogue[i].title if i in service.catalogue else None,
                 "score": s} for r, (i, s) in enumerate(ranked)]
        return {"object": "list", "model": service.model_id, "data": data}

    @app.post("/v1/images/generations")
    async def images(body: ImageRequest):
        check_model(body.model)
        try:
            messages = service.history_messages(history_of(body.history), "gen-2" if body.prompt else "gen-1", body.prompt)
            prompt, _ = service.prompt(messages)
            params = service.image_params(SamplingParams(temperature=body.temperature, top_k=body.top_k or 0, seed=body.seed,
                                                         n=body.n))
        except (BadInput, ParamError) as e:
            raise bad(str(e), e.param) from None
        answers, _ = await collect(tagged(outputs(f"img-{uuid.uuid4().hex}", prompt, params)))
        data = []
        for i in range(body.n):
            buf = io.BytesIO()
            service.decode_image(answers.get((0, i), EMPTY)["tokens"]).save(buf, format="PNG")
            data.append({"b64_json": base64.b64encode(buf.getvalue()).decode()})
        return {"created": int(time.time()), "model": service.model_id, "data": data}

    return app
