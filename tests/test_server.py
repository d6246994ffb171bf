"""The HTTP API: a real uvicorn server on a loopback port, driven by httpx and by the `openai` client."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from recfm.foundation.build import build_model
from recfm.tokenizers.bundle import Tokenizers

pytestmark = pytest.mark.usefixtures("one_thread_module")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving an app on a thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def run_dir(small_default, tiny_tokenizers, tmp_path_factory):
    """A run folder as training writes it: model, tokenizers, run.json naming the domain."""
    out = tmp_path_factory.mktemp("serve") / "tiny-run"
    tok = Tokenizers(tiny_tokenizers, "atomic")
    torch.manual_seed(0)
    model = build_model("tiny", tok)
    # an identifier view as tuning records it (id_sequence 50), not fused by default: the ranking tests
    # below compare the prompt's own scores unless they ask for the fusion
    model.config.id_view_length, model.config.id_view_weight = 50, 0.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "run.json").write_text(json.dumps({"stage": "tune", "domain": str(small_default.path)}))
    return out


def make_service(run_dir, **engine):
    from recfm.serving.engine import EngineConfig
    from recfm.serving.service import Service

    return Service(run_dir, engine_config=EngineConfig(**{"num_blocks": 512, "block_size": 8, **engine}))


@pytest.fixture(scope="module")
def server(run_dir):
    from recfm.serving.api import build_app

    service = make_service(run_dir)
    srv = Server(build_app(service))
    srv.service = service
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def items(small_default):
    return [r["item_id"] for r in small_default.items if r["image_path"]][:6]


def png_data_url(color=(200, 30, 30), size=(40, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def history_message(items, text="Which item will the user interact with next?"):
    parts = [{"type": "item", "item_id": i, "view": "history"} for i in items[:4]]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# --- plain routes --------------------------------------------------------------------------------


def test_health_models_metrics(client, oai):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()["data"]
    assert models[0]["id"] == "tiny-run" and models[0]["root"] == "tiny-run"
    assert [m.id for m in oai.models.list()] == ["tiny-run"]
    text = client.get("/metrics").text
    for name in ("recfm_requests_running", "recfm_requests_waiting", "recfm_kv_blocks_used", "recfm_kv_blocks_free",
                 "recfm_prefix_cache_hit_rate", "recfm_generation_tokens_per_second",
                 "recfm_time_to_first_token_seconds_bucket", "recfm_time_per_output_token_seconds_bucket"):
        assert name in text


# --- chat ----------------------------------------------------------------------------------------


def test_chat_with_items_and_an_image_equals_the_engine(client, server, items):
    messages = history_message(items)
    messages[0]["content"].insert(0, {"type": "image_url", "image_url": {"url": png_data_url()}})
    r = client.post("/v1/chat/completions", json={"model": "tiny-run", "messages": messages, "max_tokens": 8,
                                                  "temperature": 0, "ignore_eos": True, "some_unknown_field": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    # the same request through transformers' generate on the same weights gives the same text
    svc = server.service
    key, px = svc.image_pixels(png_data_url(), "test")
    conv = [{"role": "user", "content": [{"type": "image", "image": key}, *messages[0]["content"][1:]]}]
    prompt, _ = svc.prompt(conv, {key: px})
    assert body["usage"]["prompt_tokens"] == len(prompt.token_ids)
    pix = torch.stack([p if p is not None else svc.item_images(k[5:]) for _, k, p in prompt.images])
    with torch.no_grad():
        ref_model = type(svc.model).from_pretrained(svc.run_dir).eval()
        out = ref_model.generate(input_ids=torch.tensor([prompt.token_ids]), pixel_values=ref_model.model.normalize_pixels(pix),
                                 max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    new = out[0, len(prompt.token_ids):].tolist()
    assert body["choices"][0]["message"]["content"] == svc.engine._detokenize(new)


def test_openai_client_chat_and_streaming(oai, client, items):
    messages = history_message(items, "Explain why this user would like it.")
    full = oai.chat.completions.create(model="tiny-run", messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    chunks = list(oai.chat.completions.create(model="tiny-run", messages=messages, max_tokens=12, temperature=0, stream=True,
                                              stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    token_chunks = [c for c in chunks[1:] if c.choices]
    assert len(token_chunks) == 12  # one chunk per token
    assert "".join(c.choices[0].delta.content or "" for c in token_chunks) == full.choices[0].message.content
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert full.usage.completion_tokens == 12


def test_sse_wire_format_ends_with_done(client, items):
    with client.stream("POST", "/v1/chat/completions", json={"messages": history_message(items), "max_tokens": 3,
                                                             "stream": True, "temperature": 0}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[1][6:])["object"] == "chat.completion.chunk"


def test_plain_curl_works(server, items):
    import shutil

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"messages": history_message(items), "max_tokens": 3, "stream": True})
    out = subprocess.run(["curl", "-sN", server.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in out.stdout.splitlines() if ln]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 4


def test_sampling_options_seed_n_logprobs(oai, items):
    messages = history_message(items)
    kw = dict(model="tiny-run", messages=messages, max_tokens=6, temperature=1.0, top_p=0.9, seed=11, n=3)
    a = oai.chat.completions.create(**kw, extra_body={"top_k": 40, "ignore_eos": True})
    b = oai.chat.completions.create(**kw, extra_body={"top_k": 40, "ignore_eos": True})
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 3 and len({c.message.content for c in a.choices}) > 1
    lp = oai.chat.completions.create(model="tiny-run", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                     top_logprobs=3, extra_body={"ignore_eos": True})
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)  # greedy takes the best


def test_stop_strings(oai, items):
    messages = history_message(items)
    free = oai.chat.completions.create(model="tiny-run", messages=messages, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].message.content
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    if not stop.strip():
        pytest.skip("the untrained model's text has no usable stop string here")
    r = oai.chat.completions.create(model="tiny-run", messages=messages, max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == free[: free.find(stop)] and r.choices[0].finish_reason == "stop"


def test_constrained_item_answers(oai, server, items):
    messages = history_message(items)
    allowed = items[4:6]
    r = oai.chat.completions.create(model="tiny-run", messages=messages, max_tokens=6, temperature=1.0, seed=0, n=4,
                                    extra_body={"allowed_items": allowed})
    for c in r.choices:
        got = c.message.model_extra["items"][0]["item_id"]
        assert got in allowed and c.finish_reason == "stop"
    r = oai.chat.completions.create(model="tiny-run", messages=messages, max_tokens=6, temperature=1.0, seed=0, n=4,
                                    extra_body={"exclude_seen": True})
    for c in r.choices:
        got = c.message.model_extra["items"][0]["item_id"]
        assert got in server.service.catalogue and got not in items[:4]


def test_chat_item_answers_fuse_the_identifier_view(client, server, items):
    """An answer constrained to one item (atomic ids) is fused with the identifier view of the items the
    messages mention: its log-probabilities are the prompt's plus the weight times the view's (normalised
    over the items that can be answered), up to a constant; greedy, it answers the fused first."""
    svc = server.service
    hist, n = items[:4], len(svc.tok.items) - 4
    item_of = {svc.tok.text.decode(svc.tok.items.encode(i)): i for i in svc.tok.items.item_ids}

    def answer(**extra) -> tuple[str, dict[str, float]]:
        r = client.post("/v1/chat/completions", json={"messages": history_message(hist), "max_tokens": 3, "temperature": 0,
                                                      "exclude_seen": True, "logprobs": True, "top_logprobs": 20, **extra})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        top = choice["logprobs"]["content"][0]["top_logprobs"]
        return choice["message"]["items"][0]["item_id"], {item_of[t["token"]]: t["logprob"] for t in top}

    view = client.post("/v1/recommendations", json={"history": hist, "k": n, "template": "id_sequence"}).json()["data"]
    view = dict(zip([d["item_id"] for d in view], torch.tensor([d["score"] for d in view]).log_softmax(0).tolist()))
    (alone, prompt), (fused, both) = answer(), answer(id_view_weight=3.0)  # this run's own weight is 0
    assert alone == max(prompt, key=prompt.get) and fused == max(both, key=both.get)
    assert not (set(prompt) | set(both)) & set(hist)
    shared = sorted(set(prompt) & set(both))
    assert len(shared) >= 3
    offsets = [both[i] - prompt[i] - 3.0 * view[i] for i in shared]
    assert offsets == pytest.approx([offsets[0]] * len(offsets), abs=1e-3)
    assert max(abs(3.0 * view[i] - 3.0 * view[shared[0]]) for i in shared) > 0.01  # the view did move them
    assert answer(id_view_weight=0)[1] == pytest.approx(prompt)
    r = client.post("/v1/chat/completions", json={"messages": history_message(hist), "exclude_seen": True,
                                                  "id_view_weight": -1})
    assert r.status_code == 400 and "id_view_weight" in r.text


# --- completions ---------------------------------------------------------------------------------


def test_completions_string_tokens_and_batch(oai, client, tok):
    a = oai.completions.create(model="tiny-run", prompt="a red round lamp", max_tokens=5, temperature=0,
                               extra_body={"ignore_eos": True})
    ids = tok.encode("a red round lamp")
    b = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 5, "temperature": 0, "ignore_eos": True}).json()
    assert a.choices[0].text == b["choices"][0]["text"] and a.usage.completion_tokens == 5
    batch = client.post("/v1/completions", json={"prompt": ["a red round lamp", "blue"], "max_tokens": 5, "temperature": 0,
                                                 "ignore_eos": True, "logprobs": 2}).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert batch["choices"][0]["text"] == a.choices[0].text
    assert len(batch["choices"][1]["logprobs"]["token_logprobs"]) == 5
    stream = list(oai.completions.create(model="tiny-run", prompt="a red round lamp", max_tokens=5, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in stream) == a.choices[0].text


@pytest.fixture(scope="module")
def tok(run_dir):
    from recfm.tokenizers.text import load_text_tokenizer

    return load_text_tokenizer(run_dir)


# --- recommendation-native -----------------------------------------------------------------------


def test_recommendations_rank_the_catalogue(client, server, items):
    r = client.post("/v1/recommendations", json={"history": items[:4], "k": 5})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 5 and [d["rank"] for d in data] == [1, 2, 3, 4, 5]
    assert all(d["item_id"] not in items[:4] for d in data)
    scores = [d["score"] for d in data]
    assert scores == sorted(scores, reverse=True)
    # the same as the model's full-ranking head on the same prompt
    svc = server.service
    prompt, _ = svc.prompt(svc.history_messages(items[:4], "next-1"))
    pix = svc.model.model.normalize_pixels(torch.stack([svc.item_images(k[5:]) for _, k, _ in prompt.images]))
    ref_model = type(svc.model).from_pretrained(svc.run_dir).eval()
    s = ref_model.score_items(torch.tensor([prompt.token_ids]), None, pix)[0]
    s[[svc.tok.items.index(i) for i in items[:4]]] = float("-inf")
    assert [d["item_id"] for d in data] == [svc.tok.items.item_id(int(i)) for i in torch.topk(s, 5).indices]
    allowed = client.post("/v1/recommendations", json={"history": items[:4], "k": 3, "allowed_items": items[3:6],
                                                       "exclude_seen": False}).json()["data"]
    assert {d["item_id"] for d in allowed} == set(items[3:6])
    # the identifier-only view: the prompt is the history's identifiers, scored after the last one
    from recfm.instructions.chat import id_sequence_prompt

    seq = client.post("/v1/recommendations", json={"history": items[:4], "k": 5, "template": "id_sequence"}).json()["data"]
    enc = id_sequence_prompt(items[:4], svc.ctx)
    s = ref_model.score_items(torch.tensor([enc.input_ids]))[0]
    s[[svc.tok.items.index(i) for i in items[:4]]] = float("-inf")
    assert [d["item_id"] for d in seq] == [svc.tok.items.item_id(int(i)) for i in torch.topk(s, 5).indices]


def test_recommendations_fuse_the_prompt_with_the_identifier_view(client, server, items):
    """With id_view_weight, a template's ranking is the prompt's log-probabilities plus the weight times
    the identifier view's over the same history, each normalised over the items that can be answered."""
    svc = server.service
    hist = items[:4]
    n = len(svc.tok.items) - len(hist)

    def ranking(k=n, **extra) -> list[tuple[str, float]]:
        r = client.post("/v1/recommendations", json={"history": hist, "k": k, **extra})
        assert r.status_code == 200, r.text
        return [(d["item_id"], d["score"]) for d in r.json()["data"]]

    def log_probs(ranked):
        return dict(zip([i for i, _ in ranked], torch.tensor([s for _, s in ranked]).log_softmax(0).tolist()))

    prompt, view = log_probs(ranking(id_view_weight=0)), log_probs(ranking(template="id_sequence"))
    assert len(prompt) == len(view) == n and not set(prompt) & set(hist)
    fused = ranking(k=n, id_view_weight=0.5)
    expected = {i: prompt[i] + 0.5 * view[i] for i in prompt}
    assert {i for i, _ in fused} == set(expected)
    assert [s for _, s in fused] == pytest.approx([expected[i] for i, _ in fused], abs=1e-4)
    assert [s for _, s in fused] == sorted((s for _, s in fused), reverse=True)
    assert ranking(k=5) == ranking(k=5, id_view_weight=0)  # this run's own weight is 0
    # the identifier view is never fused with itself
    assert ranking(k=5, template="id_sequence", id_view_weight=2) == ranking(k=5, template="id_sequence")
    # Python callers (Service.recommend, which steps its own engine) get the same fused ranking
    own = make_service(svc.run_dir).recommend(hist, k=5, id_view_weight=0.5)
    assert [i for i, _ in own] == [i for i, _ in fused[:5]]
    assert [s for _, s in own] == pytest.approx([s for _, s in fused[:5]], abs=1e-4)
    r = client.post("/v1/recommendations", json={"history": hist, "id_view_weight": -1})
    assert r.status_code == 400 and "id_view_weight" in r.text


def test_semantic_id_recommendations_rank_the_whole_catalogue(small_default, tiny_tokenizers, tmp_path, items):
    """Semantic ids: /v1/recommendations scores every item by its exact code-sequence log-probability
    (not only what a beam kept), with the history excluded, allowed_items and the identifier view."""
    from recfm.foundation.generation import score_semantic_items
    from recfm.instructions.chat import id_sequence_prompt
    from recfm.serving.api import build_app

    out = tmp_path / "semantic-run"
    tok = Tokenizers(tiny_tokenizers, "semantic")
    torch.manual_seed(0)
    build_model("tiny", tok).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "run.json").write_text(json.dumps({"stage": "tune", "domain": str(small_default.path)}))
    svc = make_service(out)
    srv = Server(build_app(svc))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            k = len(svc.tok.items) - 4  # every item but the history: a beam of width k + 4 would be needed
            data = c.post("/v1/recommendations", json={"history": items[:4], "k": k}).json()["data"]
            allowed = c.post("/v1/recommendations", json={"history": items[:4], "k": 3, "allowed_items": items[3:6],
                                                          "exclude_seen": False}).json()["data"]
            seq = c.post("/v1/recommendations", json={"history": items[:4], "k": 5, "template": "id_sequence"}).json()["data"]
    finally:
        srv.stop()
    assert len(data) == k and {d["item_id"] for d in data} == set(svc.tok.items.item_ids) - set(items[:4])
    scores = [d["score"] for d in data]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)  # log-probabilities
    prompt, _ = svc.prompt(svc.history_messages(items[:4], "next-1"))
    pix = svc.model.model.normalize_pixels(torch.stack([svc.item_images(r[5:]) for _, r, _ in prompt.images]))
    ref = score_semantic_items(svc.model, svc.tok.items, torch.tensor([prompt.token_ids]), pixel_values=pix)[0]
    for d in data[:5]:
        assert abs(d["score"] - float(ref[svc.tok.items.index(d["item_id"])])) < 1e-4
    assert {d["item_id"] for d in allowed} == set(items[3:6])
    enc = id_sequence_prompt(items[:4], svc.ctx)
    ref = score_semantic_items(svc.model, svc.tok.items, torch.tensor([enc.input_ids]),
                               exclude=[[svc.tok.items.index(i) for i in items[:4]]])[0]
    assert [d["item_id"] for d in seq] == [svc.tok.items.item_id(int(i)) for i in torch.topk(ref, 5).indices]


def test_image_generation_returns_pngs(client, server, items):
    r = client.post("/v1/images/generations", json={"history": items[:3], "prompt": "lamp", "n": 2, "seed": 1})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2
    size = server.service.tok.vq.config.image_size
    for d in data:
        im = Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))
        assert im.format == "PNG" and im.size == (size, size)
    again = client.post("/v1/images/generations", json={"history": items[:3], "prompt": "lamp", "n": 2, "seed": 1}).json()
    assert again["data"] == data  # seeded: the same pictures


# --- errors --------------------------------------------------------------------------------------


def error_of(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_400_with_openai_bodies(client, items):
    ok = history_message(items)
    error_of(client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    err = error_of(client.post("/v1/chat/completions", json={"messages": []}), 400)
    assert "messages" in err["param"]
    err = error_of(client.post("/v1/chat/completions", json={"messages": ok, "temperature": -1}), 400)
    assert err["param"] == "temperature"
    err = error_of(client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "item", "item_id": "no-such-item"}]}]}), 400)
    assert "no-such-item" in err["message"] and err["param"] == "messages[0].content[0]"
    for url, words in (("data:image/png;base64,bm90IGFuIGltYWdl", "bad image"),
                       ("https://example.com/cat.png", "only data: URLs"),
                       ("/etc/passwd", "only data: URLs"),
                       ("data:text/plain;base64,aGk=", "bad image")):
        err = error_of(client.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}), 400)
        assert words in err["message"]
    err = error_of(client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "video", "video": "x"}]}]}), 400)
    assert "video" in err["message"]
    err = error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 5000}]}), 400)
    assert "context" in err["message"]
    err = error_of(client.post("/v1/chat/completions", json={"messages": ok, "max_tokens": 100000}), 400)
    assert err["param"] == "max_tokens"
    error_of(client.post("/v1/completions", json={"prompt": [10**9]}), 400)
    error_of(client.post("/v1/recommendations", json={"history": ["no-such-item"]}), 400)
    err = error_of(client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": ok}), 404)
    assert err["code"] == "model_not_found"
    assert client.get("/health").status_code == 200  # nothing above hurt the engine


def test_decompression_bomb_is_refused(client):
    big = Image.new("1", (20000, 20000))  # 400 M pixels, a few kB as PNG
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    err = error_of(client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}), 400)
    assert "pixels" in err["message"]


@pytest.mark.parametrize("route", ["chat", "completion", "completion-batch"])
def test_disconnect_mid_stream_frees_the_blocks(client, server, items, route):
    before = server.service.engine.stats.generation_tokens
    if route == "chat":
        url, body = "/v1/chat/completions", {"messages": history_message(items)}
    else:  # one prompt streams straight from its request; several are merged from a task each
        url, body = "/v1/completions", {"prompt": "a red round lamp" if route == "completion" else ["a red lamp", "blue"]}
    room = server.service.engine.max_model_len - 200  # more than the prompts leave would be a 400, not a stream
    with httpx.Client(base_url=server.url, timeout=60) as c2:
        with c2.stream("POST", url, json={**body, "max_tokens": room, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            for k, _ in enumerate(r.iter_lines()):
                if k > 5:
                    break
    deadline = time.time() + 20
    while time.time() < deadline:
        if metric(client, "recfm_requests_running") == 0 and metric(client, "recfm_kv_blocks_used") == 0:
            break
        time.sleep(0.1)
    assert metric(client, "recfm_requests_running") == 0
    assert metric(client, "recfm_kv_blocks_used") == 0
    assert server.service.engine.stats.generation_tokens - before < room  # it did not run to the end


def test_api_key_queue_full_and_dead_engine(run_dir, items):
    from recfm.serving.api import build_app

    srv = Server(build_app(make_service(run_dir), api_key="sesame", max_waiting=0))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert error_of(c.get("/v1/models"), 401)["type"] == "authentication_error"
            auth = {"Authorization": "Bearer sesame"}
            assert c.get("/v1/models", headers=auth).status_code == 200
            err = error_of(c.post("/v1/chat/completions", json={"messages": history_message(items)}, headers=auth), 429)
            assert err["code"] == "queue_full"
            srv.server.config.app.state.engine.shutdown()  # the engine thread is gone
            assert c.get("/health").status_code == 503
            error_of(c.post("/v1/recommendations", json={"history": items[:2]}, headers=auth), 503)
    finally:
        srv.stop()


def test_engine_on_its_own_thread_answers_the_same(run_dir, items, client):
    """`engine_loop="thread"` (the engine stepping beside the event loop instead of on it) gives the
    same greedy answer, streams, and frees a disconnected stream's blocks too."""
    from recfm.serving.api import build_app
    from recfm.serving.async_engine import AsyncEngine

    with pytest.raises(ValueError, match="loop must be one of"):
        AsyncEngine(make_service(run_dir).engine, loop="process")
    body = {"messages": history_message(items), "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    want = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    srv = Server(build_app(make_service(run_dir), engine_loop="thread"))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == want
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in r.iter_lines()
                          if line.startswith("data: {")]
            assert "".join(deltas) == want
            with c.stream("POST", "/v1/completions", json={"prompt": "a red round lamp", "max_tokens": 300,
                                                           "ignore_eos": True, "stream": True}) as r:
                assert r.status_code == 200
                for k, _ in enumerate(r.iter_lines()):
                    if k > 3:
                        break
            deadline = time.time() + 20
            while time.time() < deadline and metric(c, "recfm_kv_blocks_used") > 0:
                time.sleep(0.1)
            assert metric(c, "recfm_requests_running") == 0 and metric(c, "recfm_kv_blocks_used") == 0
    finally:
        srv.stop()


# --- the command ---------------------------------------------------------------------------------


def test_recfm_serve_command_answers_the_openai_client(run_dir, items):
    from openai import OpenAI

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "recfm.cli", "serve", str(run_dir), "--port", str(port),
                             "--kv-cache-mb", "16"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
            assert proc.poll() is None, proc.stdout.read()
        oai = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = oai.chat.completions.create(model="tiny-run", messages=history_message(items), max_tokens=4,
                                        extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_recfm_chat_attaches_items_and_answers(run_dir, items):
    script = f"/item {items[0]}\n/item no-such-item\nWhich item will the user interact with next?\n/quit\n"
    out = subprocess.run([sys.executable, "-m", "recfm.cli", "chat", str(run_dir), "--max-tokens", "6"], input=script,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert f"attached item {items[0]}" in out.stdout
    assert "unknown item 'no-such-item'" in out.stderr
    answer = [ln for ln in out.stdout.splitlines() if ln.startswith("recfm> ")]
    assert len(answer) == 1 and len(answer[0]) > len("recfm> ")
