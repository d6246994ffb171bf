"""Quantized loading: every option loads, generates deterministically, answers the chat API; an
option the machine cannot run is an error at start-up."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch

from recfm.foundation.build import build_model
from recfm.serving.quantization import OPTIONS, QuantizationError, check, load_quantized, weight_bytes
from recfm.tokenizers.bundle import Tokenizers

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def run_dir(small_default, tiny_tokenizers, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "tiny-run"
    tok = Tokenizers(tiny_tokenizers, "atomic")
    torch.manual_seed(0)
    build_model("tiny", tok).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "run.json").write_text(json.dumps({"stage": "tune", "domain": str(small_default.path)}))
    return out


def runnable(option: str) -> bool:
    try:
        check(option)
        return True
    except QuantizationError:
        return False


def greedy(service, messages, n=8):
    from recfm.serving import SamplingParams

    prompt, _ = service.prompt(messages)
    return service.engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0][0]


MESSAGES = [{"role": "user", "content": "Which item will the user interact with next?"}]


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_loads_generates_and_serves(run_dir, option):
    from test_server import Server

    from recfm.serving import EngineConfig, Service
    from recfm.serving.api import build_app

    if not runnable(option):
        pytest.skip(f"{option} cannot run on this machine")
    svc = Service(run_dir, engine_config=EngineConfig(num_blocks=256, block_size=8), quantization=option)
    first = greedy(svc, MESSAGES)
    again = greedy(Service(run_dir, engine_config=EngineConfig(num_blocks=256, block_size=8), quantization=option), MESSAGES)
    assert len(first) == 8 and first == again  # deterministic across loads
    srv = Server(build_app(svc))
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 8, "temperature": 0,
                                                               "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        assert r.json()["choices"][0]["message"]["content"] == svc.engine._detokenize(first)
    finally:
        srv.stop()


def test_quantized_weights_are_smaller(run_dir):
    full = weight_bytes(load_quantized(run_dir, "none"))
    sizes = {o: weight_bytes(load_quantized(run_dir, o)) for o in OPTIONS[1:] if runnable(o)}
    assert sizes["bf16"] == pytest.approx(full / 2, rel=0.01)
    lm = load_quantized(run_dir, "none").model.language_model.layers
    linear = sum(p.numel() * 4 for n, p in lm.named_parameters() if "proj" in n)
    assert sizes["int8"] <= full - linear * 0.6  # the decoder's linear layers shrank about 4x (less per-channel scales)
    for o in ("nf4", "fp4"):
        if o in sizes:
            assert sizes[o] <= full - linear * 0.75


def test_unrunnable_options_fail_at_start_up(run_dir, monkeypatch):
    with pytest.raises(QuantizationError, match="choose one of"):
        check("fp8")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(QuantizationError, match="pip install"):
        check("nf4")
    out = subprocess.run([sys.executable, "-m", "recfm.cli", "serve", str(run_dir), "--quantization", "fp8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown quantization 'fp8'" in out.stderr


def test_export_llama_computes_what_recfm_computes_on_text(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recfm.foundation import RecFMForCausalLM

    out = tmp_path / "llama"
    r = subprocess.run([sys.executable, "-m", "recfm.cli", "export", "llama", str(run_dir), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    llama = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(llama).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok.encode("<|user|>which item next?<|end|><|assistant|>")])
    recfm = RecFMForCausalLM.from_pretrained(run_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids=ids).logits, recfm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        a = llama.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = recfm.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert a.tolist() == b.tolist()
