"""The backbone (recfm.foundation): sizes, fusion, item modes, gradients, save/load, generation,
full ranking, loading a stock Llama checkpoint, image generation, bf16, and how a sequence is read.

Everything runs on the `tiny` preset over the small synthetic domain, whose tokenizers are trained
once for this module (a 500-token BPE, a 20-step VQ). Batches are real training conversations
rendered by `recfm.instructions.chat.render`, with the domain's own images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from recfm.data import leave_one_out
from recfm.foundation import RecFMConfig, RecFMForCausalLM, build_config, token_image_index
from recfm.foundation.build import build_model
from recfm.foundation.configuration import PRESETS
from recfm.foundation.generation import beam_items, generate_image_codes, generate_images, score_semantic_items
from recfm.instructions import Item, RenderContext, build_training_examples, render
from recfm.instructions.chat import IGNORE
from recfm.tokenizers.bundle import Tokenizers
from recfm.training.collate import item_description

FUSIONS = ("early", "cross_attention")
ITEM_MODES = ("atomic", "semantic", "content")


# --- fixtures and helpers ------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread_module")


@dataclass
class World:
    domain: object
    folder: object
    examples: object  # datasets.Dataset of training conversations
    _tokenizers: dict = field(default_factory=dict)
    _pixels: dict = field(default_factory=dict)

    def tokenizers(self, mode: str) -> Tokenizers:
        if mode not in self._tokenizers:
            self._tokenizers[mode] = Tokenizers(self.folder, mode)
        return self._tokenizers[mode]

    def pixels(self, item_id: str, size: int) -> torch.Tensor:
        """uint8 (3, size, size) pixels of an item's image."""
        key = (item_id, size)
        if key not in self._pixels:
            with Image.open(self.domain.image_path(item_id)) as im:
                arr = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)).copy()
            self._pixels[key] = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        return self._pixels[key]

    def rows(self, task: str | None = None, n: int = 8) -> list[dict]:
        """`n` training rows: of one task, or one of every task (in turn) when task is None."""
        tasks = self.examples["task"]
        if task is not None:
            return [self.examples[i] for i, t in enumerate(tasks) if t == task][:n]
        seen, out = set(), []
        for i, t in enumerate(tasks):
            if t not in seen:
                seen.add(t)
                out.append(self.examples[i])
        return out[:n]


@pytest.fixture(scope="module")
def world(small_default, tiny_tokenizers) -> World:
    folder = tiny_tokenizers
    split = leave_one_out(small_default)
    examples = build_training_examples(small_default, split, per_user=1, seed=0)
    return World(small_default, folder, examples)


def make_model(world: World, mode: str = "atomic", fusion: str = "early", seed: int = 0, **overrides) -> RecFMForCausalLM:
    torch.manual_seed(seed)
    toks = world.tokenizers(mode)
    model = build_model("tiny", toks, fusion=fusion, **overrides)
    if mode == "content":
        load_catalogue(world, model, toks)
    return model


def load_catalogue(world: World, model: RecFMForCausalLM, toks: Tokenizers) -> None:
    cfg = model.config
    n, length = cfg.n_items, cfg.item_text_len
    size = cfg.vision_config.image_size
    text_ids = torch.full((n, length), -1, dtype=torch.long)
    pixels = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    has_image = torch.zeros(n, dtype=torch.bool)
    for k, iid in enumerate(toks.items.item_ids):
        row = world.domain.item(iid)
        ids = toks.text.encode(item_description(row["title"], row["text"]), add_special_tokens=False)[:length]
        text_ids[k, : len(ids)] = torch.tensor(ids)
        if row["image_path"] and k % 5 != 4:  # every fifth item without its image: the no-image path
            pixels[k], has_image[k] = world.pixels(iid, size), True
    model.model.set_catalogue(text_ids, pixels, has_image)


def context(world: World, model: RecFMForCausalLM, mode: str) -> RenderContext:
    toks = world.tokenizers(mode)
    catalogue = {r["item_id"]: Item(r["title"], r["text"], r["image_path"] is not None) for r in world.domain.items}
    return RenderContext(tokenizer=toks.text, item_tokenizer=toks.items, catalogue=catalogue,
                         image_tokens=model.config.image_tokens, image_codes=toks.image_codes,
                         image_code_offset=toks.image_code_offset, max_tokens=4096)


def encode(world, model, mode, rows, prompt_only: bool = False):
    ctx = context(world, model, mode)
    out = []
    for r in rows:
        messages = json.loads(r["messages"])
        out.append(render(messages[:-1], ctx, add_generation_prompt=True) if prompt_only else render(messages, ctx))
    return out


def collate(world, model, encoded, left_pad: bool = False) -> dict:
    """Pad (right for training, left for generation), stack the images of every <image> run in
    row-major order, and list the content item of every <item> placeholder (row-major)."""
    pad = model.config.pad_token_id
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), length), pad, dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    refs, content = [], []
    for b, e in enumerate(encoded):
        n = len(e.input_ids)
        cols = slice(length - n, length) if left_pad else slice(0, n)
        ids[b, cols], labels[b, cols], mask[b, cols] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        refs += e.image_refs
        content += [idx for _, idx in sorted(e.content_positions)]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if refs:
        size = model.config.vision_config.image_size
        raw = torch.stack([world.pixels(r.removeprefix("item:"), size) for r in refs])
        batch["pixel_values"] = model.model.normalize_pixels(raw)
    if content:
        batch["content_item_ids"] = torch.tensor(content, dtype=torch.long)
    return batch


def training_batch(world, model, mode, n: int = 8) -> dict:
    return collate(world, model, encode(world, model, mode, world.rows(n=n)))


def grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(sum(g.abs().sum() for g in grads)) if grads else 0.0


def without(batch: dict, *keys) -> dict:
    return {k: v for k, v in batch.items() if k not in keys}


# --- 1. presets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,low,high", [("tiny", 0, 5e6), ("small", 10e6, 30e6), ("base", 100e6, 300e6)])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_presets_build_from_config_in_their_size_range(preset, low, high, fusion):
    cfg = build_config(preset, vocab_size=5000, n_items=2000, fusion=fusion)
    assert cfg.vocab_size == 5000 and cfg.hidden_size == PRESETS[preset]["text"]["hidden_size"]
    if preset == "base":
        with torch.device("meta"):
            model = RecFMForCausalLM(cfg)
    else:
        model = RecFMForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert low <= n < high, f"{preset}: {n / 1e6:.1f}M parameters, outside [{low / 1e6:.0f}M, {high / 1e6:.0f}M)"
    assert model.lm_head.out_features == 5000 and model.model.vision_tower is not None
    assert len(model.model.cross_attn) == (len(cfg.cross_attention_layers()) if fusion == "cross_attention" else 0)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="fusion must be one of"):
        build_config("tiny", vocab_size=100, fusion="late")
    with pytest.raises(ValueError, match="image_tokens must be between 1 and 8"):
        build_config("tiny", vocab_size=100, image_tokens=9)
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("huge", vocab_size=100)


def test_cross_attention_never_sits_after_the_last_layer():
    """A block after the last decoder layer only changes the item tokens' own outputs, which no
    answer token attends to: it would train nothing. Blocks run before their layer."""
    for layers in (1, 2, 3, 6):
        for every in (1, 2, 4):
            cfg = build_config("tiny", vocab_size=100, fusion="cross_attention", cross_attention_every=every)
            cfg.text_config.num_hidden_layers = layers
            idx = cfg.cross_attention_layers()
            assert idx and all(0 <= i < layers for i in idx)


# --- 2. forward + backward on rendered batches ---------------------------------------------------


@pytest.mark.parametrize("mode", ITEM_MODES)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_backward_reaches_every_part(world, mode, fusion):
    model = make_model(world, mode, fusion)
    model.train()
    batch = training_batch(world, model, mode)
    assert batch["pixel_values"].shape[0] > 8  # histories with images, and the standalone images of which_image
    assert (mode == "content") == ("content_item_ids" in batch)
    inner = model.model
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()

    # the language model, the head, the embeddings
    lm = inner.language_model
    assert grad_norm(lm.layers[0]) > 0 and grad_norm(lm.embed_tokens) > 0 and grad_norm(model.lm_head) > 0
    # a frozen vision tower gets nothing
    assert all(not p.requires_grad and p.grad is None for p in inner.vision_tower.parameters())
    if mode == "content":  # every part of the item encoder, and the ranking head
        enc = inner.item_encoder
        for part in (enc.text, enc.image, enc.mlp, enc.id_residual):
            assert grad_norm(part) > 0, part
        assert enc.no_image.grad is not None and enc.no_image.grad.abs().sum() > 0  # items without an image
        assert grad_norm(model.item_head) > 0
    if fusion == "early":
        assert grad_norm(inner.projector) > 0
        return

    # cross-attention: the gates (zero at first) get gradient, so one step opens them
    blocks = list(inner.cross_attn.values())
    assert blocks
    for blk in blocks:
        assert blk.attn_gate.grad.abs().item() > 0 and blk.ff_gate.grad.abs().item() > 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.zero_grad()
    assert all(blk.attn_gate.item() != 0 and blk.ff_gate.item() != 0 for blk in blocks)
    # now the images reach the loss: the projector learns through the blocks ...
    model(**batch).loss.backward()
    assert grad_norm(inner.projector) > 0 and grad_norm(blocks[0].kv) > 0
    # ... and change what the language model predicts after the items (at the answers)
    model.eval()
    with torch.no_grad():
        opened = model(**without(batch, "labels")).logits
        for blk in blocks:
            blk.attn_gate.zero_()
            blk.ff_gate.zero_()
        closed = model(**without(batch, "labels")).logits
    answer = batch["labels"] != IGNORE
    assert (opened - closed)[answer].abs().max() > 1e-4


def test_unfrozen_vision_tower_gets_gradient(world):
    model = make_model(world, "atomic", "early", freeze_vision=False)
    batch = training_batch(world, model, "atomic", n=3)
    assert all(p.requires_grad for p in model.model.vision_tower.parameters())
    model(**batch).loss.backward()
    assert grad_norm(model.model.vision_tower) > 0
    assert not model.model._image_cache  # an unfrozen tower's features are never cached


def test_gradient_checkpointing_gives_the_same_gradients(world):
    grads = []
    for checkpointing in (False, True):
        model = make_model(world, "atomic", "cross_attention")
        with torch.no_grad():
            for blk in model.model.cross_attn.values():
                blk.attn_gate.fill_(0.5)
                blk.ff_gate.fill_(0.5)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(**training_batch(world, model, "atomic", n=3)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("cross_attn" in n for n in grads[0])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6)


def test_image_count_mismatch_is_a_clear_error(world):
    model = make_model(world)
    batch = training_batch(world, model, "atomic", n=2)
    with pytest.raises(ValueError, match="<image> tokens in the input but"):
        model(**{**batch, "pixel_values": batch["pixel_values"][1:]})


# --- 3. save / load --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,fusion", [("atomic", "early"), ("content", "cross_attention")])
def test_save_pretrained_round_trip_gives_identical_logits(world, tmp_path, mode, fusion):
    from transformers import AutoModelForCausalLM

    model = make_model(world, mode, fusion)
    with torch.no_grad():  # gates that matter, so a gate lost on the way would show
        for blk in model.model.cross_attn.values():
            blk.attn_gate.fill_(0.7)
            blk.ff_gate.fill_(-0.3)
    model.eval()
    batch = without(training_batch(world, model, mode, n=4), "labels")
    with torch.no_grad():
        ref = model(**batch).logits
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], files

    for cls in (RecFMForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path)
        assert type(loaded) is RecFMForCausalLM and not loaded.training
        assert loaded.config.item_mode == mode and loaded.config.fusion == fusion
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, ref, rtol=0, atol=0)
        if mode == "content":  # the catalogue travels with the weights
            assert torch.equal(loaded.model.catalogue_text_ids, model.model.catalogue_text_ids)
            assert torch.equal(loaded.model.catalogue_pixels, model.model.catalogue_pixels)


# --- 4. generation -----------------------------------------------------------------------------------


def greedy_without_cache(model, batch, steps: int) -> list[int]:
    ids = batch["input_ids"]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(**{**without(batch, "labels", "attention_mask"), "input_ids": ids}).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_greedy_generate_with_and_without_images(world, fusion):
    model = make_model(world, "atomic", fusion).eval()
    with torch.no_grad():  # open the gates so images influence generation in cross-attention mode too
        for blk in model.model.cross_attn.values():
            blk.attn_gate.fill_(1.0)
            blk.ff_gate.fill_(1.0)
    steps = 4
    rows = world.rows("next_item", n=2)
    prompts = encode(world, model, "atomic", rows, prompt_only=True)
    assert all(p.image_refs for p in prompts)
    kw = dict(max_new_tokens=steps, do_sample=False, pad_token_id=model.config.pad_token_id)

    # one prompt with images: the cached generate equals a greedy loop over full forwards
    one = without(collate(world, model, prompts[:1]), "labels")
    out = model.generate(**one, **kw)[0, one["input_ids"].shape[1]:].tolist()
    assert out == greedy_without_cache(model, one, steps)
    # a left-padded batch gives each prompt what it gets alone (images matched to the right rows)
    both = without(collate(world, model, prompts, left_pad=True), "labels")
    batch_out = model.generate(**both, **kw)[:, both["input_ids"].shape[1]:].tolist()
    alone = [model.generate(**without(collate(world, model, [p]), "labels"), **kw)[0, -steps:].tolist() for p in prompts]
    assert batch_out == alone
    # the images matter
    no_images = model.generate(**without(one, "pixel_values"), **kw)[0, -steps:].tolist()
    with torch.no_grad():
        a = model(**one).logits[0, -1]
        b = model(**without(one, "pixel_values")).logits[0, -1]
    assert (a - b).abs().max() > 1e-4
    assert len(no_images) == steps

    # a text-only prompt (no images anywhere) works too
    ctx = context(world, model, "atomic")
    text = render([{"role": "user", "content": "What should I watch next?"}], ctx, add_generation_prompt=True)
    assert not text.image_refs
    t = without(collate(world, model, [text]), "labels")
    assert "pixel_values" not in t
    out = model.generate(**t, **kw)[0, t["input_ids"].shape[1]:].tolist()
    assert out == greedy_without_cache(model, t, steps)


@pytest.mark.parametrize("mode", ["atomic", "semantic"])
def test_trie_constrained_beam_returns_only_real_items(world, mode):
    model = make_model(world, mode, "early").eval()
    toks = world.tokenizers(mode)
    prompts = encode(world, model, mode, world.rows("next_item", n=2), prompt_only=True)
    batch = without(collate(world, model, prompts, left_pad=True), "labels")
    k = 6
    result = beam_items(model, toks.items, batch["input_ids"], k=k, attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"])
    real = set(toks.items.item_ids)
    assert len(result) == 2
    for items in result:
        assert len(items) == k and len(set(items)) == k and set(items) <= real


@pytest.mark.parametrize("fusion", ["early", "cross_attention"])
def test_semantic_scores_are_each_items_exact_log_probability(world, fusion):
    """Full ranking for semantic ids: every item's score equals the log-probability of its whole code
    sequence after the prompt, summed token by token from a plain forward pass over prompt + codes,
    for each row of a left-padded batch with images; excluded items get -inf."""
    model = make_model(world, "semantic", fusion).eval()
    with torch.no_grad():
        for blk in model.model.cross_attn.values():
            blk.attn_gate.fill_(1.0)
    items = world.tokenizers("semantic").items
    table = np.asarray(items.id_table)
    assert table.shape[1] >= 2 and len(table) >= 10
    prompts = encode(world, model, "semantic", world.rows("next_item", n=3), prompt_only=True)
    assert len({len(p.input_ids) for p in prompts}) > 1  # the batch really is padded
    batch = without(collate(world, model, prompts, left_pad=True), "labels")
    scores = score_semantic_items(model, items, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                  exclude=[[0, 3], [], [1]])
    assert scores.shape == (3, len(table))
    assert torch.isinf(scores[0, [0, 3]]).all() and torch.isinf(scores[2, 1]) and torch.isfinite(scores[1]).all()
    for b, prompt in enumerate(prompts):
        one = without(collate(world, model, [prompt]), "labels")
        n = one["input_ids"].shape[1]
        for i in [0, 1, 2, 3, len(table) // 2, len(table) - 1]:
            codes = torch.as_tensor(table[i])[None]
            ids = torch.cat([one["input_ids"], codes], 1)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                               pixel_values=one.get("pixel_values")).logits[0].float().log_softmax(-1)
            want = sum(float(logits[n - 1 + level, table[i, level]]) for level in range(table.shape[1]))
            if torch.isfinite(scores[b, i]):
                assert abs(float(scores[b, i]) - want) < 1e-4, (b, i)
    # the best-scored item is the best complete sequence a wide beam finds
    best = beam_items(model, items, batch["input_ids"], k=len(table), attention_mask=batch["attention_mask"],
                      pixel_values=batch.get("pixel_values"))
    assert items.item_ids[int(scores[1].argmax())] in best[1][:3]


@pytest.mark.parametrize("fusion", ["early", "cross_attention"])
def test_semantic_scores_in_several_tree_passes_equal_one_pass(world, fusion):
    """A catalogue whose trie has more inner nodes than one pass takes is scored in runs of items,
    each with its own trie over the same prompt cache (cut back after each run): every score is the
    same as from one pass over the whole trie."""
    from recfm.foundation.generation import _trees_for

    model = make_model(world, "semantic", fusion).eval()
    with torch.no_grad():
        for blk in model.model.cross_attn.values():
            blk.attn_gate.fill_(1.0)
    items = world.tokenizers("semantic").items
    prompts = encode(world, model, "semantic", world.rows("next_item", n=3), prompt_only=True)
    batch = without(collate(world, model, prompts, left_pad=True), "labels")
    args = (model, items, batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"))
    whole = score_semantic_items(*args)
    table, runs = _trees_for(items, 3)
    assert len(runs) > 2 and all(len(tree.tokens) <= 3 for _, tree in runs)
    assert sorted(np.concatenate([r for r, _ in runs]).tolist()) == list(range(len(table)))  # every item once
    torch.testing.assert_close(score_semantic_items(*args, max_nodes=3), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,fusion", [("atomic", "early"), ("content", "cross_attention")])
def test_beam_search_gives_each_beam_its_own_rows_images(world, mode, fusion):
    """Beam search copies each prompt num_beams times; a prompt's images (and content items) must be
    copied as a group ([A, B] -> [A, B, A, B]), not one by one ([A, A, B, B]), or beams see the
    wrong pictures."""
    model = make_model(world, mode, fusion).eval()
    with torch.no_grad():
        for blk in model.model.cross_attn.values():
            blk.attn_gate.fill_(1.0)
    prompts = encode(world, model, mode, world.rows("next_item", n=1), prompt_only=True)
    one = without(collate(world, model, prompts), "labels")
    assert one["pixel_values"].shape[0] >= 2
    assert mode != "content" or len(one["content_item_ids"]) >= 2
    with torch.no_grad():
        ref = model(**one).logits[0, -1]
        out = model.generate(**one, num_beams=3, num_return_sequences=3, max_new_tokens=1, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=model.config.pad_token_id)
    first = out.logits[0]  # (beams, vocab): the prompt's next-token logits, once per beam
    for beam in first:
        torch.testing.assert_close(beam, ref, rtol=1e-4, atol=1e-4)


# --- 7. full ranking ----------------------------------------------------------------------------------


def test_score_items_atomic_is_the_item_token_logit(world):
    model = make_model(world, "atomic", "early").eval()
    cfg = model.config
    toks = world.tokenizers("atomic")
    assert toks.items.encode(toks.items.item_ids[5]) == [cfg.item_token_offset + 5]
    prompts = encode(world, model, "atomic", world.rows("next_item", n=2), prompt_only=True)
    batch = without(collate(world, model, prompts), "labels")  # right-padded, different lengths
    assert batch["attention_mask"].sum(1).unique().numel() == 2
    scores = model.score_items(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert scores.shape == (2, cfg.n_items)
    for b, p in enumerate(prompts):
        single = without(collate(world, model, [p]), "labels")
        with torch.no_grad():
            logits = model(**single).logits[0, -1]
        torch.testing.assert_close(scores[b], logits[cfg.item_token_offset : cfg.item_token_offset + cfg.n_items],
                                   rtol=1e-4, atol=1e-4)
    seen = [[0, 3, 7], []]
    masked = model.score_items(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], exclude=seen)
    assert torch.isneginf(masked[0, seen[0]]).all() and torch.isfinite(masked[1]).all()
    assert torch.isfinite(masked[0]).sum() == cfg.n_items - 3
    torch.testing.assert_close(masked[1], scores[1])


def test_words_mode_without_item_images_builds_and_trains_only_what_it_reads(world):
    """item_text words + item_image false: the item vector is the item's words (no token projection,
    no image projection: DDP refuses parameters without gradient), whatever its pixels, and one
    backward pass reaches every trainable parameter."""
    from recfm.tokenizers.words import WordVocabulary
    from recfm.training.collate import ItemImages, content_catalogue

    toks = world.tokenizers("content")
    rows = [world.domain.item(i) for i in toks.items.item_ids]
    vocab = WordVocabulary.from_texts([item_description(r["title"], r["text"]) for r in rows], 2)
    torch.manual_seed(0)
    model = build_model("tiny", toks, item_text="words", item_word_vocab=list(vocab.words),
                        item_word_idf=list(vocab.idf), item_image=False)
    content_catalogue(model, toks, world.domain, ItemImages(world.domain, model.config.vision_config.image_size))
    inner = model.model
    enc = inner.item_encoder
    assert enc.text is None and enc.image is None and enc.words.num_embeddings == len(vocab) > 0
    assert bool((inner.catalogue_word_ids >= 0).any(1).all())  # every item has shared words here
    before = inner.item_embeddings().detach().clone()
    inner.catalogue_pixels.random_(0, 255)
    assert torch.equal(before, inner.item_embeddings().detach())
    model.train()
    model(**training_batch(world, model, "content")).loss.backward()
    assert grad_norm(enc.words) > 0 and grad_norm(enc.mlp) > 0 and grad_norm(enc.id_residual) > 0
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def test_score_items_content_is_the_head_against_each_item(world):
    model = make_model(world, "content", "cross_attention").eval()
    prompts = encode(world, model, "content", world.rows("next_item", n=1), prompt_only=True)
    batch = without(collate(world, model, prompts), "labels")
    assert len(batch["content_item_ids"]) > 1
    scores = model.score_items(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                               batch["content_item_ids"], exclude=[[1, 2]])
    with torch.no_grad():
        h = model.model(**batch).last_hidden_state[0, -1]
        q = model.item_head(h)
        one_by_one = torch.stack([q @ model.model.item_embeddings(torch.tensor([k]))[0]
                                  for k in range(model.config.n_items)])
    assert torch.isneginf(scores[0, [1, 2]]).all()
    keep = torch.ones(model.config.n_items, dtype=torch.bool)
    keep[[1, 2]] = False
    torch.testing.assert_close(scores[0, keep], one_by_one[keep], rtol=1e-4, atol=1e-4)
    assert one_by_one.std() > 0  # items differ (their content differs)


def test_semantic_mode_points_to_the_trie_scorer(world):
    model = make_model(world, "semantic", "early")
    with pytest.raises(ValueError, match="score_semantic_items"):
        model.score_items(torch.tensor([[1, 2, 3]]))


# --- 8. a stock Llama checkpoint inside RecFM ---------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    lm = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama")
    lm.save_pretrained(path)
    return path, lm


def test_loaded_llama_computes_the_same_inside_recfm_text_only(world, llama_dir):
    path, lm = llama_dir
    model = build_model("tiny", world.tokenizers("atomic"), text_path=path, fusion="early").eval()
    assert model.config.vocab_size == len(world.tokenizers("atomic").text) > 400
    torch.manual_seed(0)
    ids = torch.randint(20, 400, (2, 30))
    with torch.no_grad():
        ours = model(input_ids=ids).logits[..., :400]
        ref = lm(input_ids=ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # recfm's added tokens start at the mean of the checkpoint's rows
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[400:], lm.get_input_embeddings().weight.mean(0).expand(emb.shape[0] - 400, -1))
    torch.testing.assert_close(model.lm_head.weight[:400], lm.lm_head.weight)


def test_zero_gates_leave_a_loaded_llama_unchanged_with_images(world, llama_dir):
    path, lm = llama_dir
    model = build_model("tiny", world.tokenizers("atomic"), text_path=path, fusion="cross_attention").eval()
    assert len(model.model.cross_attn)
    batch = without(training_batch(world, model, "atomic", n=3), "labels", "attention_mask")
    ids = batch["input_ids"]
    ids = torch.where(ids < 400, ids, torch.full_like(ids, 100))  # keep inside the checkpoint's vocabulary
    assert (ids == model.config.image_token_id).any()
    batch["input_ids"] = ids
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
        ours = model(**batch).logits[..., :400]
        text_only = model(input_ids=ids).logits[..., :400]
        for blk in model.model.cross_attn.values():  # the test can see a difference when there is one
            blk.attn_gate.fill_(1.0)
        opened = model(**batch).logits[..., :400]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_only, ref, rtol=1e-5, atol=1e-5)
    assert (opened - ref).abs().max() > 1e-3


# --- 9. image generation ------------------------------------------------------------------------------


def test_generate_image_codes_and_images(world):
    model = make_model(world, "atomic", "early").eval()
    toks = world.tokenizers("atomic")
    cfg = model.config
    assert cfg.image_codebook_size == 64 and cfg.image_code_offset == toks.image_code_offset
    prompts = encode(world, model, "atomic", world.rows("image_generation", n=2), prompt_only=True)
    batch = without(collate(world, model, prompts, left_pad=True), "labels")
    codes = generate_image_codes(model, batch["input_ids"], attention_mask=batch["attention_mask"],
                                 pixel_values=batch["pixel_values"], seed=0)
    assert codes.shape == (2, cfg.image_grid ** 2) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < cfg.image_codebook_size
    again = generate_image_codes(model, batch["input_ids"], attention_mask=batch["attention_mask"],
                                 pixel_values=batch["pixel_values"], seed=0)
    assert torch.equal(codes, again)  # seeded
    images = generate_images(model, toks.vq, batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"], seed=1, do_sample=False)
    size = toks.vq.config.image_size
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (size, size) for im in images)


# --- 10. bf16 on CPU -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_bf16_autocast_forward_backward(world, fusion):
    model = make_model(world, "content", fusion)
    batch = training_batch(world, model, "content", n=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert grad_norm(model.model.language_model) > 0
    # images encoded (and cached) under autocast serve a plain fp32 forward afterwards, exactly as
    # freshly encoded ones would
    model.eval()
    with torch.no_grad():
        after = model(**batch).logits
        model.model.clear_image_cache()
        fresh = model(**batch).logits
    assert after.dtype == torch.float32
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


def test_bf16_weights_forward_after_fp32_use(world):
    """A model that has already encoded (and cached) images in fp32, then cast to bf16, still runs,
    and its logits stay close to fp32's."""
    model = make_model(world, "atomic", "cross_attention").eval()
    with torch.no_grad():
        for blk in model.model.cross_attn.values():
            blk.attn_gate.fill_(1.0)
    batch = without(training_batch(world, model, "atomic", n=2), "labels")
    with torch.no_grad():
        ref = model(**batch).logits
        assert model.model._image_cache
        model.to(torch.bfloat16)
        low = model(**batch).logits
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


# --- 11. how a sequence is read ------------------------------------------------------------------------


def test_token_image_index_hand_built():
    cfg = RecFMConfig(text_config={"model_type": "llama", "vocab_size": 50, "hidden_size": 16,
                                   "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
                      image_tokens=2, image_token_id=4, item_start_id=6, item_end_id=7, fusion="cross_attention")
    S, E, I, W = 6, 7, 4, 20  # item start / end, image, a word
    rows = torch.tensor([
        # item with an image, item without one, a standalone image, a word
        [1, S, I, I, W, W, E, S, W, W, E, I, I, W],
        # an item with an image (the batch's fourth image: images count row-major), then padding
        [1, W, S, W, I, I, W, E, W, 0, 0, 0, 0, 0],
    ])
    expected = torch.tensor([
        [-1, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, 1, 1, -1],
        [-1, -1, 2, 2, 2, 2, 2, 2, -1, -1, -1, -1, -1, -1],
    ])
    assert torch.equal(token_image_index(rows, cfg), expected)
    # no item spans at all: only the image tokens themselves
    flat = torch.tensor([[W, I, I, W, I, I]])
    assert token_image_index(flat, cfg).tolist() == [[-1, 0, 0, -1, 1, 1]]


# --- 5. PEFT (LoRA) ------------------------------------------------------------------------------------


def test_peft_lora_trains_only_the_adapters(world):
    from peft import LoraConfig, get_peft_model

    model = make_model(world, "atomic", "early")
    batch = training_batch(world, model, "atomic", n=4)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("language_model.layers.0.self_attn.q_proj.lora_A" in n for n in trainable)
    assert any("language_model.layers.1.self_attn.v_proj.lora_B" in n for n in trainable)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = peft_model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merged_names = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                    for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert set(merged_names) == set(base)
    for k, v in base.items():
        assert torch.equal(merged_names[k], v), k
    lora_b = [p for n, p in peft_model.named_parameters() if "language_model" in n and "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


# --- 6. TRL SFTTrainer ---------------------------------------------------------------------------------


class RenderCollator:
    """For a Trainer: rows of training conversations (a `messages` JSON column) -> a model batch."""

    def __init__(self, world, model, mode):
        self.world, self.model, self.mode = world, model, mode

    def __call__(self, rows):
        return collate(self.world, self.model, encode(self.world, self.model, self.mode, rows))


def test_trl_sft_trainer_runs_on_rendered_conversations(world, tmp_path):
    """TRL 1.x's SFTTrainer on a pre-rendered dataset with our collator. It always swaps the LM head
    for its own fused token cross-entropy over `labels`, which is RecFM's loss for atomic and
    semantic ids without the optional extra terms (checked here); content mode's catalogue loss and
    the focal / context / contrastive terms need a trainer that calls the model's own loss."""
    from trl import SFTConfig, SFTTrainer

    mode = "atomic"
    model = make_model(world, mode, "cross_attention")
    toks = world.tokenizers(mode)
    rows = world.rows(n=8)
    data = world.examples.select([world.examples["messages"].index(r["messages"]) for r in rows])
    collator = RenderCollator(world, model, mode)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=2,
                     learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                     remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                     dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                         processing_class=toks.text)
    batch = collator(rows[:2])
    with torch.no_grad():
        ours = model(**batch).loss
        theirs = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    result = trainer.train()
    assert trainer.state.global_step == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses)) and np.isfinite(result.training_loss)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert any("language_model" in n for n in changed) and any("cross_attn" in n for n in changed)
    assert any("projector" in n for n in changed)  # the opened gates let images train the projector


def test_item_residual_dropout_reads_some_items_from_content_alone_in_training_only():
    from recfm.foundation.modeling import ItemEncoder

    torch.manual_seed(0)
    enc = ItemEncoder(8, 400, id_residual=True)
    torch.nn.init.normal_(enc.id_residual.weight)
    text, image, has = torch.randn(400, 8), torch.randn(400, 8), torch.ones(400, dtype=torch.bool)
    idx = torch.arange(400)
    enc.eval()
    with torch.no_grad():
        enc.id_residual.weight.zero_()
        enc.no_image.zero_()
        content = enc(text, image, has, idx)  # what the item's content alone gives
        enc.id_residual.weight.normal_()
        full = enc(text, image, has, idx, residual_dropout=0.5)  # eval: every residual in, whatever the rate
        assert not torch.allclose(full, content)
        enc.train()
        dropped = enc(text, image, has, idx, residual_dropout=0.5)
        alone = torch.isclose(dropped, content, atol=1e-6).all(1)
        kept = torch.isclose(dropped, full, atol=1e-6).all(1)
    assert bool((alone | kept).all()) and 140 < int(alone.sum()) < 260  # about half, each item all or nothing


def test_hidden_dropout_drops_the_input_and_each_branch_in_training_only(world):
    model = make_model(world)
    batch = without(training_batch(world, model, "atomic", n=4), "labels")
    model.eval()
    with torch.no_grad():
        plain = model(**batch).logits
        model.config.hidden_dropout = 0.3
        assert torch.equal(model(**batch).logits, plain)  # eval: no dropout whatever the rate
        model.train()
        a, b = model(**batch).logits, model(**batch).logits
    assert not torch.allclose(a, plain) and not torch.allclose(a, b)  # two training passes drop different units
    # each residual branch's output is dropped: zeros where dropped, the rest scaled by 1 / (1 - p)
    layer = model.model.language_model.layers[0]
    x = torch.randn(2, 5, model.config.text_config.hidden_size)
    with torch.no_grad():
        model.eval()
        ref = layer.mlp(x)
        model.train()
        out = layer.mlp(x)
    dropped = out == 0
    assert 0.15 < float(dropped.float().mean()) < 0.45
    assert torch.allclose(out[~dropped], ref[~dropped] / 0.7, atol=1e-5)
    model.config.hidden_dropout = 0.0
    with torch.no_grad():
        assert torch.equal(layer.mlp(x), ref)  # rate 0: training passes are exact
        model.config.hidden_dropout = 0.3
        model(**batch)
    assert layer.mlp._forward_hooks and layer.self_attn._forward_hooks
    model.eval()  # evaluation and serving, which call the language model directly, run without the hooks at all
    assert not layer.mlp._forward_hooks and not layer.self_attn._forward_hooks
