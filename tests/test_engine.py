"""The serving engine: greedy outputs equal transformers' generate token for token in every batch
composition, with chunked prefill, prefix-cache hits and forced preemption; the sampler, stops,
constraints, n > 1 and block accounting."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from recfm.data import leave_one_out
from recfm.foundation.build import build_model
from recfm.instructions.chat import render
from recfm.instructions.examples import build_training_examples
from recfm.serving.engine import Engine, EngineConfig
from recfm.serving.kv_cache import BlockManager
from recfm.serving.sequence import ParamError, Prompt, SamplingParams
from recfm.tokenizers.bundle import Tokenizers
from recfm.training.collate import ItemImages, content_catalogue, render_context

pytestmark = pytest.mark.usefixtures("one_thread_module")
N_NEW = 10


@pytest.fixture(scope="module")
def rows(small_default):
    split = leave_one_out(small_default)
    ex = build_training_examples(small_default, split, per_user=1, seed=0)
    wanted = ["next_item", "explanation", "which_image", "review", "rating", "yes_no"]
    out = []
    for task in wanted:
        out.append(next(json.loads(r["messages"]) for r in ex if r["task"] == task))
    return out


class Setup:
    """A tiny model with its tokenizers and its prompts (as engine input and as generate() input)."""

    def __init__(self, domain, tok_dir, rows, mode="atomic", fusion="early", seed=0):
        self.tok = Tokenizers(tok_dir, mode)
        torch.manual_seed(seed)
        self.model = build_model("tiny", self.tok, fusion=fusion).eval()
        size = self.model.config.vision_config.image_size
        self.images = ItemImages(domain, size)
        if mode == "content":
            content_catalogue(self.model, self.tok, domain, self.images)
        self.ctx = render_context(self.tok, domain, self.model.config, 4096)
        self.end = self.tok.text.convert_tokens_to_ids("<|end|>")
        self.encoded = [render(m[:-1], self.ctx, add_generation_prompt=True) for m in rows]

    def prompt(self, e) -> Prompt:
        return Prompt(e.input_ids, [(p, r, self.images(r.removeprefix("item:"))) for p, r in zip(e.image_positions, e.image_refs)],
                      sorted(e.content_positions))

    @property
    def prompts(self) -> list[Prompt]:
        return [self.prompt(e) for e in self.encoded]

    @torch.no_grad()
    def reference(self, e, n_new=N_NEW, **kwargs) -> list[int]:
        """transformers' generate on one prompt, cut after the first end token."""
        ids = torch.tensor([e.input_ids])
        extra = {}
        if e.image_refs:
            pix = torch.stack([self.images(r.removeprefix("item:")) for r in e.image_refs])
            extra["pixel_values"] = self.model.model.normalize_pixels(pix)
        if e.content_positions:
            extra["content_item_ids"] = torch.tensor([i for _, i in sorted(e.content_positions)])
        out = self.model.generate(input_ids=ids, max_new_tokens=n_new, do_sample=False, eos_token_id=[self.end, 2],
                                  pad_token_id=0, **extra, **kwargs)[0, ids.shape[1]:].tolist()
        for k, t in enumerate(out):
            if t in (self.end, 2):
                return out[: k + 1]
        return out

    def engine(self, **kw) -> Engine:
        return Engine(self.model, self.tok.text, EngineConfig(**{"num_blocks": 256, "block_size": 8, **kw}))


@pytest.fixture(scope="module", params=[("atomic", "early"), ("atomic", "cross_attention"), ("content", "early")],
                ids=lambda p: "-".join(p))
def setup(request, small_default, tiny_tokenizers, rows):
    mode, fusion = request.param
    s = Setup(small_default, tiny_tokenizers, rows, mode, fusion)
    s.expected = [s.reference(e) for e in s.encoded]  # before any engine touches the model
    if fusion == "cross_attention":  # gates start at zero: open them so images change the answer
        for blk in s.model.model.cross_attn.values():
            blk.attn_gate.data.fill_(1.0)
            blk.ff_gate.data.fill_(1.0)
        s.expected = [s.reference(e) for e in s.encoded]
    return s


GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0)


def outputs(engine, prompts, params=GREEDY):
    return [r[0] for r in engine.generate(prompts, params)]


def test_greedy_equals_generate_all_at_once(setup):
    eng = setup.engine()
    assert outputs(eng, setup.prompts) == setup.expected
    assert eng.blocks.num_used == 0  # every block returned (cached ones are free to reuse)


def test_greedy_equals_generate_in_padded_steps(setup):
    """Steps of more than 64 tokens run padded to a multiple of 32 rows (one set-up matrix shape per
    bucket); the padding rows change no answer."""
    from recfm.serving.decoder import FastDecoder

    assert [FastDecoder.rows(n) for n in (1, 64, 65, 96, 97, 500)] == [1, 64, 96, 96, 128, 512]
    eng = setup.engine()
    fast, sizes = eng.runner.fast, []

    class Spy:  # the runner's decoder, with the sizes of the batches it gets
        def __call__(self, x, *a):
            sizes.append(x.shape[0])
            return fast(x, *a)

        logits = fast.logits

    eng.runner.fast = Spy()
    assert outputs(eng, setup.prompts) == setup.expected
    assert any(n > 64 and n % 32 for n in sizes), sizes  # a step that was padded


def test_greedy_equals_generate_through_the_modules(setup):
    """The runner's other path (the language model's own modules, for decoders the fast pass does not
    know) gives the same answers."""
    eng = setup.engine(fast_decoder=False)
    assert eng.runner.fast is None
    assert outputs(eng, setup.prompts) == setup.expected


def test_greedy_equals_generate_with_either_decode_attention(setup):
    """Decode attention by the native kernel (read in place from the paged cache) and by gathered
    blocks + SDPA (where the kernel cannot be built) give generate's answers."""
    from recfm.serving import native

    gathered = setup.engine(native_attention=False)
    assert gathered.runner.native is None
    assert outputs(gathered, setup.prompts) == setup.expected
    if native.paged_decode() is None:
        pytest.skip(f"the native kernel could not be built here: {native.error()}")
    eng = setup.engine()
    assert eng.runner.native is not None
    assert outputs(eng, setup.prompts) == setup.expected


def _paged_case(seed: int, nb: int, heads: int, lengths: list[int], scale: float, dtype=torch.float32, d: int = 16):
    """A paged cache (blocks of 4, 2 kv heads of d), disjoint random block tables, queries, and the
    reference: fp32 SDPA over the gathered blocks of the same (dtype-rounded) values."""
    from recfm.serving import attention

    g = torch.Generator().manual_seed(seed)
    bs, kvh = 4, 2
    kc, vc = (torch.randn(nb, bs, kvh, d, generator=g).to(dtype) for _ in range(2))
    lengths = torch.tensor(lengths)
    width = int(-(-lengths.max() // bs))
    tables = torch.randperm(nb, generator=g)[: len(lengths) * width].view(len(lengths), width)
    q = torch.randn(len(lengths), heads, d, generator=g).to(dtype)
    mask = (torch.arange(width * bs)[None] < lengths[:, None])[:, None, None, :]
    kd, vd = (attention.gather(c, tables).transpose(1, 2).float() for c in (kc, vc))
    want = torch.nn.functional.scaled_dot_product_attention(q.float().unsqueeze(2), kd, vd, attn_mask=mask, scale=scale,
                                                            enable_gqa=True).squeeze(2)
    return q, kc, vc, tables, lengths, want


def _paged_decode_or_skip():
    from recfm.serving import native

    op = native.paged_decode()
    if op is None:
        pytest.skip(f"the native kernel could not be built here: {native.error()}")
    return op


@pytest.mark.parametrize("d,heads", [(16, 6), (64, 2), (8, 6), (16, 20)])
def test_native_decode_attention_equals_sdpa_over_gathered_blocks(d, heads):
    """Head sizes 16 and 64 take the kernel's vector path (16 lanes at a time, polynomial exp); 8, and
    10 query heads per kv head, take its scalar loop."""
    op = _paged_decode_or_skip()
    # grouped-query (3 query heads per kv head); one token, a full block, one into the next, more than
    # the 16 scores the vector exp takes at a time, ...
    q, kc, vc, tables, lengths, want = _paged_case(0, nb=64, heads=heads, lengths=[1, 4, 5, 17, 30, 9], scale=0.3, d=d)
    torch.testing.assert_close(op(q, kc, vc, tables, lengths, 0.3), want, rtol=1e-5, atol=1e-5)
    # each sequence reads its own slots up to its length and nothing else: NaN everywhere else changes nothing
    nb, bs, kvh, d = kc.shape
    used = torch.zeros(nb * bs, dtype=torch.bool)
    for row, n in zip(tables, lengths.tolist()):
        used[[int(row[t // bs]) * bs + t % bs for t in range(n)]] = True
    kc.view(nb * bs, kvh, d)[~used] = float("nan")
    vc.view(nb * bs, kvh, d)[~used] = float("nan")
    torch.testing.assert_close(op(q, kc, vc, tables, lengths, 0.3), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="length outside its block table"):
        op(q, kc, vc, tables, lengths + 100, 0.3)
    with pytest.raises(RuntimeError, match="block outside the cache"):
        op(q, kc, vc, tables + nb, lengths, 0.3)


def test_native_decode_attention_in_bf16():
    """A bf16 cache and queries (the engine's dtype on bf16 machines): the kernel accumulates in fp32,
    so it matches fp32 SDPA over the same bf16 values up to the final rounding to bf16."""
    op = _paged_decode_or_skip()
    q, kc, vc, tables, lengths, want = _paged_case(1, nb=32, heads=4, lengths=[1, 7, 16, 25], scale=0.25,
                                                   dtype=torch.bfloat16)
    got = op(q, kc, vc, tables, lengths, 0.25)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.bfloat16().float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="all be fp32 or all bf16"):
        op(q.float(), kc, vc, tables, lengths, 0.25)


def test_norm_and_rotary_kernels_equal_transformers_arithmetic():
    """The bf16 RMSNorm (with and without the residual add) and rotary kernels give transformers'
    Llama modules' values bit for bit here, rotate q and k in place through views of a fused
    product, and refuse what they do not handle."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

    from recfm.serving import native

    k_ = native.norm_rope()
    if k_ is None:
        pytest.skip(f"the native kernel could not be built here: {native.error('norm_rope')}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 96, generator=g).bfloat16()
    delta = torch.randn(37, 96, generator=g).bfloat16()
    norm = LlamaRMSNorm(96, eps=1e-5).bfloat16()
    norm.weight.data = (torch.rand(96, generator=g) + 0.5).bfloat16()
    assert torch.equal(k_.rms_norm(x, norm.weight, 1e-5), norm(x))
    y = x.clone()
    assert torch.equal(k_.add_rms_norm_(y, delta, norm.weight, 1e-5), norm(x + delta))
    assert torch.equal(y, x + delta)  # the residual stream is updated in place
    qkv = torch.randn(37, (4 + 2 + 2) * 16, generator=g).bfloat16()
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    q, k = q.view(37, 4, 16), k.view(37, 2, 16)
    cos, sin = torch.randn(37, 16, generator=g).bfloat16(), torch.randn(37, 16, generator=g).bfloat16()
    want_q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    want_k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k_.rope_(q, k, cos, sin)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(qkv[:, :64].reshape(37, 4, 16), want_q)  # in place, through the views
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        k_.rms_norm(x.float(), norm.weight, 1e-5)


def test_fast_decoder_shares_the_weights(setup):
    """q/k/v and gate/up are fused into one matrix each, and the modules' weights are views into it:
    no second copy, and what transformers' forward reads is what the fast pass reads."""
    eng = setup.engine()
    assert eng.runner.fast is not None
    attn = setup.model.model.language_model.layers[0].self_attn
    q, k = attn.q_proj.weight, attn.k_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()


def test_fast_decoder_declines_what_it_does_not_know():
    from transformers import Qwen3Config, Qwen3Model

    from recfm.serving.decoder import FastDecoder, unsupported

    lm = Qwen3Model(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, head_dim=16, vocab_size=50))
    assert "not one of" in unsupported(lm)
    with pytest.raises(ValueError, match="does not support"):
        FastDecoder(lm)


def test_greedy_equals_generate_one_at_a_time(setup):
    eng = setup.engine(prefix_caching=False)
    assert [outputs(eng, [p])[0] for p in setup.prompts] == setup.expected


def test_greedy_equals_generate_with_chunked_prefill(setup):
    eng = setup.engine(max_num_batched_tokens=24, prefix_caching=False)
    assert outputs(eng, setup.prompts) == setup.expected
    assert eng.stats.steps > sum(len(p.token_ids) for p in setup.prompts) // 24  # prompts really were split


def test_greedy_equals_generate_with_staggered_arrivals(setup):
    eng = setup.engine(max_num_batched_tokens=64)
    prompts = setup.prompts
    got: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or eng.has_unfinished():
        if pending:  # a new request every other step, joining sequences mid-decode
            k, p = pending.pop(0)
            eng.add_request(f"r{k}", p, GREEDY)
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        if eng.has_unfinished():
            for out in eng.step():
                got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    assert [got[f"r{k}"] for k in range(len(prompts))] == setup.expected


def test_greedy_equals_generate_with_prefix_cache_hits(setup):
    eng = setup.engine()
    first = outputs(eng, setup.prompts)
    hits_before = eng.blocks.hits
    second = outputs(eng, setup.prompts)
    assert eng.blocks.hits > hits_before  # the second round found its prompts' blocks
    assert first == second == setup.expected


def test_greedy_equals_generate_when_preempted(setup):
    # room for the first two prompts and one more block: both are admitted, and both must grow
    blocks = [-(-(len(p.token_ids) + 1) // 8) for p in setup.prompts]
    longest = -(-(max(len(p.token_ids) for p in setup.prompts) + N_NEW) // 8)
    eng = setup.engine(num_blocks=max(blocks[0] + blocks[1] + 1, longest), prefix_caching=False)
    assert outputs(eng, setup.prompts) == setup.expected
    assert eng.scheduler.num_preemptions > 0
    assert eng.blocks.num_used == 0


def test_same_history_is_computed_once(setup):
    """N requests over the same user history: the shared blocks are computed by the first only."""
    eng = setup.engine()
    p = setup.prompts[0]
    outputs(eng, [p])
    before = eng.stats.prompt_tokens
    outputs(eng, [p, p, p])
    full = (len(p.token_ids) - 1) // 8 * 8
    assert eng.stats.prompt_tokens - before == 3 * (len(p.token_ids) - full)


def test_repetition_penalty_matches_generate(setup):
    e = setup.encoded[1]
    want = setup.reference(e, repetition_penalty=1.3)
    eng = setup.engine()
    assert outputs(eng, [setup.prompt(e)], SamplingParams(max_tokens=N_NEW, temperature=0, repetition_penalty=1.3))[0] == want


# --- the sampler and the request lifecycle (one configuration is enough) -------------------------


@pytest.fixture(scope="module")
def atomic(small_default, tiny_tokenizers, rows):
    return Setup(small_default, tiny_tokenizers, rows, "atomic", "early", seed=1)


def test_logprobs_are_the_models_log_softmax(atomic):
    e = atomic.encoded[0]
    eng = atomic.engine()
    req = eng.add_request("lp", atomic.prompt(e), SamplingParams(max_tokens=3, temperature=0, logprobs=5))
    picks = []
    while eng.has_unfinished():
        for out in eng.step():
            picks += out.outputs[0].logprobs
    with torch.no_grad():
        ids = torch.tensor([e.input_ids + [s.token for s in picks[:-1]]])
        pix = atomic.model.model.normalize_pixels(torch.stack([atomic.images(r[5:]) for r in e.image_refs]))
        logits = atomic.model(input_ids=ids, pixel_values=pix).logits[0, len(e.input_ids) - 1 :]
    lp = torch.log_softmax(logits.float(), -1)
    for k, s in enumerate(picks):
        assert s.logprob == pytest.approx(float(lp[k, s.token]), abs=1e-4)
        assert [t for t, _ in s.top] == torch.topk(lp[k], 5).indices.tolist()
        assert s.top[0][0] == s.token  # greedy picks the best
    assert req.finished


def test_seeded_sampling_does_not_depend_on_the_batch(atomic):
    p = atomic.prompts[2]
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    alone = outputs(atomic.engine(), [p], params)[0]
    batched = outputs(atomic.engine(), [atomic.prompts[0], p, atomic.prompts[3]], [GREEDY, params, SamplingParams(max_tokens=5, seed=1)])[1]
    other_seed = outputs(atomic.engine(), [p], SamplingParams(max_tokens=8, temperature=1.0, seed=8))[0]
    assert alone == batched
    assert alone != other_seed


def test_batched_draws_follow_temperature_top_k_and_top_p():
    """The exponential race over a batch picks each token with its probability after temperature,
    top-k and top-p; rows with different settings in one batch each get their own."""
    from recfm.serving.sampler import sample
    from recfm.serving.sequence import Request, Sequence

    def seqs(n, **kw):
        return [Sequence(i, Request(f"r{i}", Prompt([1]), SamplingParams(**kw)), 0, [1], 1) for i in range(n)]

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 20000

    def freq(**kw):
        picks = [s.token for s in sample(logits.repeat(n, 1), seqs(n, **kw))]
        return np.bincount(picks, minlength=4) / n

    assert np.allclose(freq(temperature=1.0), [0.5, 0.3, 0.15, 0.05], atol=0.015)
    hot = torch.softmax(logits / 2.0, -1).numpy()
    assert np.allclose(freq(temperature=2.0), hot, atol=0.015)
    assert np.allclose(freq(temperature=1.0, top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
    assert np.allclose(freq(temperature=1.0, top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)  # 0.5 < 0.7, 0.8 >= 0.7
    mixed = seqs(3, temperature=1.0, top_k=1) + seqs(1, temperature=0) + seqs(1, temperature=1.0, top_p=0.01)
    assert [s.token for s in sample(logits.repeat(5, 1), mixed)] == [0, 0, 0, 0, 0]


def test_n_answers_share_the_prompt(atomic):
    p = atomic.prompts[1]
    eng = atomic.engine()
    res = eng.generate([p], SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3))[0]
    assert len(res) == 3 and len({tuple(r) for r in res}) > 1  # three different samples
    assert eng.stats.prompt_tokens == len(p.token_ids)  # the prompt was computed once
    again = atomic.engine().generate([p], SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3))[0]
    assert again == res
    greedy = atomic.engine().generate([p], SamplingParams(max_tokens=6, temperature=0, n=2))[0]
    assert greedy[0] == greedy[1]


def test_stops_and_lengths(atomic):
    p = atomic.prompts[1]
    eng = atomic.engine()
    free = outputs(eng, [p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(free) == 12
    cut = outputs(eng, [p], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[free[3]]))[0]
    assert cut == free[: free.index(free[3]) + 1]
    text = eng._detokenize(free)
    needle = text[len(text) // 2 : len(text) // 2 + 3]
    if needle.strip():
        eng.add_request("stop", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[needle]))
        got, reason = "", None
        while eng.has_unfinished():
            for out in eng.step():
                got += out.outputs[0].text
                reason = out.outputs[0].finish_reason or reason
        assert got == text[: text.find(needle)] and reason == "stop"


def test_incremental_detokenization_matches_a_whole_decode(atomic):
    """Text streamed token by token (DecodeStream, and the window fallback) equals decoding all the
    tokens at once; a character split over tokens is never emitted half; a character cut off at the
    end is flushed."""
    from recfm.serving.sequence import Request, Sequence

    eng = atomic.engine()
    tok = atomic.tok.text
    text = "naïve café: 世界 🎉 done"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in ids), "the text must have characters split over tokens"
    for rust in (eng._rust_tokenizer, None):
        eng._rust_tokenizer = rust
        for cut in (len(ids), len(ids) - 3):  # whole, and stopped inside the emoji's bytes
            seq = Sequence(0, Request("r", Prompt([1]), SamplingParams(max_tokens=4)), 0, [], 0)
            pieces = []
            for t in ids[:cut]:
                seq.visible.append(t)
                pieces.append(eng._detokenize_step(seq))
            pieces.append(eng._detokenize_step(seq, final=True))
            assert not any("\ufffd" in p for p in pieces[:-1])
            assert "".join(pieces) == tok.decode(ids[:cut], skip_special_tokens=False)


def test_item_constraint_gives_real_items(atomic):
    from recfm.serving.constraints import ItemConstraint

    items = atomic.tok.items
    allowed = items.item_ids[5:9]
    eng = atomic.engine()
    for c in (ItemConstraint(items, atomic.end), ItemConstraint(items, atomic.end, allowed)):
        res = outputs(eng, atomic.prompts[:3], SamplingParams(max_tokens=4, temperature=1.0, seed=0, constraint=c))
        for r in res:
            assert r[-1] == atomic.end
            item = items.decode(r[:-1])
            assert item is not None and (c.trie is items.trie or item in allowed)


def test_item_constraint_bias_moves_the_first_token_only(atomic):
    """ItemConstraint.first_bias is added to the first token's logits after the mask (the fused chat
    answer): the reported log-probabilities are those of the biased logits over the allowed items."""
    from recfm.serving.constraints import ItemConstraint

    items = atomic.tok.items
    allowed = items.item_ids[5:9]
    tokens = torch.tensor([items.encode(i)[0] for i in allowed])
    plain = ItemConstraint(items, atomic.end, allowed)
    greedy = dict(max_tokens=4, temperature=0, logprobs=4)
    first = outputs(atomic.engine(), atomic.prompts[:1], SamplingParams(**greedy, constraint=plain))[0]
    lp = {}
    eng = atomic.engine()
    eng.add_request("lp", atomic.prompts[0], SamplingParams(**greedy, constraint=plain))
    while eng.has_unfinished():
        for out in eng.step():
            lp = lp or dict(out.outputs[0].logprobs[0].top)
    last = min(lp, key=lp.get)  # the allowed item the prompt likes least
    assert first[0] != last and set(lp) == set(tokens.tolist())
    values = torch.tensor([5.0 if t == last else 0.0 for t in tokens.tolist()])
    biased = ItemConstraint(items, atomic.end, allowed)
    biased.first_bias = (tokens, values)
    eng = atomic.engine()
    eng.add_request("b", atomic.prompts[0], SamplingParams(**greedy, constraint=biased))
    picks = []
    while eng.has_unfinished():
        for out in eng.step():
            picks += out.outputs[0].logprobs
    moved = torch.tensor([lp[t] for t in tokens.tolist()]) + values
    expected = dict(zip(tokens.tolist(), moved.log_softmax(0).tolist()))
    assert dict(picks[0].top) == pytest.approx(expected, abs=1e-4)
    assert picks[0].token == max(expected, key=expected.get)
    assert picks[1].token == atomic.end and [t for t, _ in picks[1].top] == [atomic.end]  # ruled-out tokens are left out


def test_image_constraint_gives_one_grid(atomic):
    from recfm.serving.constraints import ImageGridConstraint

    cfg = atomic.model.config
    n = cfg.image_grid ** 2
    c = ImageGridConstraint(cfg.img_start_id, cfg.img_end_id, cfg.image_code_offset, cfg.image_codebook_size, n, atomic.end)
    r = outputs(atomic.engine(), atomic.prompts[:1], SamplingParams(max_tokens=n + 3, seed=0, constraint=c))[0]
    assert r[0] == cfg.img_start_id and r[n + 1] == cfg.img_end_id and r[n + 2] == atomic.end
    assert all(cfg.image_code_offset <= t < cfg.image_code_offset + cfg.image_codebook_size for t in r[1 : n + 1])


def test_abort_returns_every_block(atomic):
    eng = atomic.engine(prefix_caching=False)
    for k, p in enumerate(atomic.prompts):
        eng.add_request(f"a{k}", p, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng.blocks.num_used > 0
    for k in range(len(atomic.prompts)):
        eng.abort(f"a{k}")
    assert eng.blocks.num_used == 0 and not eng.has_unfinished()


def test_bad_requests_are_refused_with_a_reason(atomic):
    eng = atomic.engine(max_model_len=64)
    vocab = atomic.model.config.text_config.vocab_size
    with pytest.raises(ParamError, match="empty"):
        eng.add_request("a", Prompt([]), GREEDY)
    with pytest.raises(ParamError, match="outside the vocabulary"):
        eng.add_request("b", Prompt([1, vocab]), GREEDY)
    with pytest.raises(ParamError, match="context"):
        eng.add_request("c", Prompt([1] * 64), GREEDY)
    with pytest.raises(ParamError, match="top_p"):
        SamplingParams(top_p=0)
    assert not eng.has_unfinished()


# --- the block manager on its own ----------------------------------------------------------------


def test_block_manager_counts_shares_and_evicts_least_recent():
    bm = BlockManager(4, 2)
    a = []
    assert bm.grow(a, 3) and len(a) == 2 and bm.num_free == 2
    bm.register(a[0], "k0")
    b = bm.match(["k0", "k1"], 2)
    assert b == [a[0]] and bm.ref[a[0]] == 2
    shared = a[0]
    bm.release(a)
    assert bm.ref[shared] == 1 and bm.num_free == 3
    bm.release(b)
    assert bm.num_free == 4
    # the cached block stays findable until the pool needs it; unkeyed blocks are reused first
    c = []
    assert bm.grow(c, 6) and shared not in c  # three blocks: the three without a key
    assert bm.match(["k0"], 1) == [shared]  # still cached
    bm.release([shared])
    assert bm.grow(c, 8) and shared in c  # all four: now the cached one is evicted
    assert bm.match(["k0"], 1) == []
    assert not bm.grow(c, 10)  # not enough: nothing taken
    assert len(c) == 4 and bm.num_free == 0


def test_prefix_keys_include_images(atomic):
    """Same tokens, different image: no cache hit (a block's key holds what its positions show)."""
    e = next(e for e in atomic.encoded if e.image_refs)
    p = atomic.prompt(e)
    other = Prompt(p.token_ids, [(pos, key + "-other", px.flip(-1)) for pos, key, px in p.images])
    eng = atomic.engine()
    outputs(eng, [p])
    hits = eng.blocks.hits
    outputs(eng, [other])
    first_image_block = p.images[0][0] // 8
    assert eng.blocks.hits - hits == first_image_block * 8
    np.testing.assert_equal(eng.blocks.num_used, 0)


def test_bf16_weights_and_cache(small_default, tiny_tokenizers, rows):
    s = Setup(small_default, tiny_tokenizers, rows[:3], "atomic", "early", seed=2)
    s.model.to(torch.bfloat16)
    want = [s.reference(e, n_new=6) for e in s.encoded]
    eng = s.engine()
    assert eng.runner.cache.k[0].dtype == torch.bfloat16
    from recfm.serving import native

    if native.norm_rope() is not None:
        assert eng.runner.fast.fused is not None  # the decoder pass runs through the norm/rotary kernels
    got = outputs(eng, s.prompts, SamplingParams(max_tokens=6, temperature=0))
    assert got == want


@pytest.mark.parametrize("loop", ["inline", "thread"])
def test_async_engine_calls_between_steps(atomic, loop):
    """`AsyncEngine.call` runs a function on the engine between steps and hands back its result or its
    error; a request generates beside it; on the event loop (inline) the loop keeps running during a
    long call, which goes to a worker thread."""
    import asyncio

    from recfm.serving.async_engine import AsyncEngine

    async def main():
        ae = AsyncEngine(atomic.engine(), loop=loop)
        try:
            assert await ae.call(lambda e: e.blocks.num_free) == e_free
            with pytest.raises(ZeroDivisionError):
                await ae.call(lambda e: 1 / 0)
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            t = asyncio.create_task(tick())
            slow = ae.call(lambda e: time.sleep(0.4) or "done")
            outs = [o async for o in ae.generate("r", atomic.prompts[0], GREEDY)]
            assert await slow == "done"
            t.cancel()
            assert outs[-1].finished and [t for o in outs for x in o.outputs for t in x.token_ids] == atomic.reference(
                atomic.encoded[0])
            assert ticks >= 10  # the loop ran on while the call slept
        finally:
            ae.shutdown()
        assert not ae.alive

    e_free = atomic.engine().blocks.num_free
    asyncio.run(main())


def test_bf16_products_from_packed_weights_equal_f_linear():
    """The decoder pass multiplies bf16 weights that oneDNN packed once; every row count gives F.linear's
    output bit for bit, with and without a bias, for contiguous and strided inputs."""
    import torch.nn.functional as F

    from recfm.serving.decoder import _linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(80, 48, generator=g).bfloat16()
    b = torch.randn(80, generator=g).bfloat16()
    for bias in (None, b):
        f = _linear(w, bias)
        for rows in (1, 5, 64, 100):
            x = torch.randn(rows, 48, generator=g).bfloat16()
            assert torch.equal(f(x), F.linear(x, w, bias))
        strided = torch.randn(7, 96, generator=g).bfloat16()[:, ::2]
        assert torch.equal(f(strided), F.linear(strided, w, bias))
    w32 = w.float()
    assert torch.equal(_linear(w32, None)(x.float()), F.linear(x.float(), w32))  # fp32: plain F.linear
