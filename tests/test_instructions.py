"""Templates, the renderer and the example builders: deterministic, held-out kept out, no leakage."""

import json

import pytest

from recfm.data import ItemIndex, leave_one_out
from recfm.instructions import (TASKS, Item, PromptTooLong, RenderContext, build_eval_examples,
                                build_pretraining_examples, build_training_examples, load_templates, render)
from recfm.instructions.chat import IGNORE
from recfm.tokenizers.items import build_item_tokenizer
from recfm.tokenizers.text import IMAGE, ITEM, train_text_tokenizer


@pytest.fixture(scope="module")
def world(small_default):
    split = leave_one_out(small_default)
    texts = [f"{r['title']}. {r['text']}" for r in small_default.items] + [t.prompt for ts in load_templates().values() for t in ts]
    tok = train_text_tokenizer(texts * 3, vocab_size=400, show_progress=False)
    index = ItemIndex.from_training(split.train, small_default.item_ids)
    items = build_item_tokenizer(index.item_ids, "atomic")
    tok.add_tokens(items.new_tokens(), special_tokens=True)
    items.bind(tok)
    cat = {r["item_id"]: Item(r["title"], r["text"], r["image_path"] is not None) for r in small_default.items}
    ctx = RenderContext(tokenizer=tok, item_tokenizer=items, catalogue=cat, image_tokens=2, max_tokens=4096)
    return small_default, split, tok, items, ctx


def test_every_task_has_six_templates_some_held_out():
    templates = load_templates()
    assert set(templates) == set(TASKS)
    for task, ts in templates.items():
        assert len(ts) >= 6, task
        n_held_out = sum(t.held_out for t in ts)
        assert n_held_out >= 1 and n_held_out < len(ts), task


def test_bad_template_file_is_a_clear_error(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("version: 1\ntasks:\n  x:\n    family: f\n    answer: '{target}'\n    templates:\n"
                 "      - {id: a, prompt: 'hello {nonsense}'}\n")
    with pytest.raises(ValueError, match=r"template 'a' uses unknown placeholder\(s\) \['nonsense'\]"):
        load_templates(p)


def test_training_examples_use_seen_templates_and_never_a_users_held_out_items(world):
    domain, split, *_ = world
    train = build_training_examples(domain, split, per_user=3, seed=0)
    assert set(train["task"]) == set(TASKS)
    assert not any(train["held_out"])
    held_out = {}
    for ex in list(split.valid) + list(split.test):
        held_out.setdefault(ex["user_id"], set()).add(ex["target"])
    for row in train:
        mentioned = {p["item_id"] for m in json.loads(row["messages"]) for p in m["content"] if p["type"] == "item"}
        assert not mentioned & held_out.get(row["user_id"], set()), row


def test_training_examples_are_deterministic(world):
    domain, split, *_ = world
    a = build_training_examples(domain, split, per_user=2, seed=5)
    b = build_training_examples(domain, split, per_user=2, seed=5)
    assert a["messages"] == b["messages"]


def test_id_sequence_view_covers_each_training_sequence_from_its_newest_end(world):
    domain, split, tok, items, ctx = world
    plain = build_pretraining_examples(split, max_history=5)
    both = build_pretraining_examples(split, max_history=5, id_sequence=4)
    assert set(plain["template_id"]) == {"history"}
    assert both.filter(lambda r: r["template_id"] == "history")["messages"] == plain["messages"]
    ids = both.filter(lambda r: r["template_id"] == "id_sequence")
    by_user: dict[str, list[list[str]]] = {}
    for row in ids:
        content = json.loads(row["messages"])[0]["content"]
        assert {p["view"] for p in content} == {"id"} and 2 <= len(content) <= 4
        by_user.setdefault(row["user_id"], []).append([p["item_id"] for p in content])
    for seq in split.train:
        chunks = by_user.get(seq["user_id"], [])
        order = list(seq["item_ids"])
        # chunks of 4 cut from the newest end, a lone oldest item left out
        assert [i for c in reversed(chunks) for i in c] == (order if len(order) % 4 != 1 else order[1:])
        if chunks:
            assert chunks[0][-1] == order[-1]
    enc = render(json.loads(ids[0]["messages"]), ctx)  # identifiers only: the context loss's targets
    n = len(json.loads(ids[0]["messages"])[0]["content"])
    item_vocab = set(items.vocab_ids.ravel().tolist())
    assert [t for t in enc.input_ids if t in item_vocab] == [items.encode(p['item_id'])[0] for p in json.loads(ids[0]['messages'])[0]['content']]
    assert len(enc.input_ids) == n + 3  # <s> <|user|> ids <|end|>

    # a second reading puts the chunk borders two items earlier: the rows differ, the items are the same
    two = build_pretraining_examples(split, max_history=5, id_sequence=4, id_readings=2)
    rows = [json.loads(m)[0]["content"] for m, t in zip(two["messages"], two["template_id"]) if t == "id_sequence"]
    firsts = {tuple(p["item_id"] for p in c) for c in rows}
    seq = max(split.train, key=lambda s: len(s["item_ids"]))
    order = list(seq["item_ids"])
    assert tuple(order[-4:]) in firsts and tuple(order[-6:-2]) in firsts
    assert len(rows) > len(ids)

    # the identifier-only stage: the same id rows, no multimodal ones; it cannot be asked without id rows
    only = build_pretraining_examples(split, max_history=5, id_sequence=4, id_readings=2, history=False)
    assert set(only["template_id"]) == {"id_sequence"}
    assert only["messages"] == [m for m, t in zip(two["messages"], two["template_id"]) if t == "id_sequence"]
    with pytest.raises(ValueError, match="id_sequence must be > 0"):
        build_pretraining_examples(split, history=False)


def test_eval_examples_cover_seen_and_held_out_templates(world):
    domain, split, *_ = world
    ev = build_eval_examples(domain, split, stage="test", max_users=10)
    by_task = {}
    for r in ev:
        by_task.setdefault(r["task"], set()).add(r["held_out"])
    assert by_task["next_item"] == {True, False}
    nxt = [r for r in ev if r["task"] == "next_item"]
    tests = {r["user_id"]: r["target"] for r in split.test}
    assert all(r["target"] == tests[r["user_id"]] for r in nxt)


def test_yes_no_rows_name_the_item_they_ask_about(world):
    """A 'yes' asks about the user's real next item; a drawn negative (item other than the target) is
    always a 'no' and an item the user never interacted with; other rows name their target."""
    domain, split, *_ = world
    ev = build_eval_examples(domain, split, stage="test", max_users=30)
    seen = {s["user_id"]: set(s["item_ids"]) for s in split.train}
    yn = [r for r in ev if r["task"] == "yes_no"]
    negatives = [r for r in yn if r["item"] != r["target"]]
    assert negatives and len(negatives) < len(yn)
    assert all(r["answer"] == "no" and r["item"] not in seen[r["user_id"]] | {r["target"]} for r in negatives)
    assert all(r["item"] == r["target"] for r in yn if r["answer"] == "yes")
    assert all(r["item"] == r["target"] for r in ev if r["task"] != "yes_no")


def test_render_layout_labels_and_image_positions(world):
    domain, split, tok, items, ctx = world
    ex = build_eval_examples(domain, split, stage="test", tasks=["next_item"], max_users=1)[0]
    messages = json.loads(ex["messages"])
    enc = render(messages, ctx)
    n_hist = sum(1 for p in messages[0]["content"] if p["type"] == "item")
    assert len(enc.image_positions) == n_hist and len(enc.item_spans) == n_hist + 1
    image_id = tok.convert_tokens_to_ids(IMAGE)
    for p in enc.image_positions:
        assert enc.input_ids[p : p + 2] == [image_id, image_id]
    assert sum(t == image_id for t in enc.input_ids) == 2 * n_hist
    # only the answer (the target's identifier + <|end|>) is labelled
    labelled = [t for t in enc.labels if t != IGNORE]
    assert labelled == items.encode(ex["target"]) + [tok.convert_tokens_to_ids("<|end|>")]
    assert render(messages, ctx).input_ids == enc.input_ids  # deterministic
    gen = render(messages[:1], ctx, add_generation_prompt=True)
    assert gen.input_ids[-1] == tok.convert_tokens_to_ids("<|assistant|>") and all(l == IGNORE for l in gen.labels)


def test_truncation_drops_oldest_history_first(world):
    domain, split, tok, items, ctx = world
    ex = build_eval_examples(domain, split, stage="test", tasks=["next_item"], max_users=1)[0]
    messages = json.loads(ex["messages"])
    full = render(messages, ctx)
    small = RenderContext(tokenizer=tok, item_tokenizer=items, catalogue=ctx.catalogue, image_tokens=2,
                          max_tokens=len(full.input_ids) - 5)
    cut = render(messages, small)
    assert cut.dropped_history >= 1 and len(cut.input_ids) <= small.max_tokens
    hist = [s[2] for s in full.item_spans][:-1]
    kept = [s[2] for s in cut.item_spans][:-1]
    assert kept == hist[cut.dropped_history:]  # the newest items survive
    tiny = RenderContext(tokenizer=tok, item_tokenizer=items, catalogue=ctx.catalogue, max_tokens=8)
    with pytest.raises(PromptTooLong):
        render(messages, tiny)


def test_content_mode_records_item_positions(world):
    domain, split, tok, _, ctx = world
    items = build_item_tokenizer(domain.item_ids, "content")
    tok.add_tokens(items.new_tokens(), special_tokens=True)
    items.bind(tok)
    c = RenderContext(tokenizer=tok, item_tokenizer=items, catalogue=ctx.catalogue, image_tokens=1)
    messages = [{"role": "user", "content": [{"type": "text", "text": "I liked"}, {"type": "item", "item_id": "3", "view": "history"},
                                             {"type": "item", "item_id": "7", "view": "history"}, {"type": "text", "text": " what next?"}]}]
    enc = render(messages, c, add_generation_prompt=True)
    item_id = tok.convert_tokens_to_ids(ITEM)
    assert [idx for _, idx in enc.content_positions] == [items.index("3"), items.index("7")]
    assert all(enc.input_ids[p] == item_id for p, _ in enc.content_positions)


def test_unknown_item_and_bad_part_are_errors(world):
    *_, ctx = world
    with pytest.raises(KeyError, match="unknown item 'nope'"):
        render([{"role": "user", "content": [{"type": "item", "item_id": "nope"}]}], ctx)
    with pytest.raises(ValueError, match="unknown content part type 'video'"):
        render([{"role": "user", "content": [{"type": "video"}]}], ctx)


def test_tokenize_domain_writes_every_tokenizer(tmp_path, small_default):
    from recfm.tokenizers.build import tokenize_domain
    from recfm.tokenizers.items import ItemTokenizer
    from recfm.tokenizers.text import load_text_tokenizer
    from recfm.tokenizers.vq import VQTokenizer

    s = tokenize_domain(small_default.path, tmp_path / "tok", vocab_size=500, vq_steps=20, vq_codebook=64, progress=False)
    assert set(s["items"]) == {"atomic", "semantic", "content"} and s["vq"]["held_out_images"] == 8
    tok = load_text_tokenizer(tmp_path / "tok" / "text")
    assert len(tok) == s["text"]["vocab_size"]
    index = ItemIndex.load(tmp_path / "tok" / "item_index.json")
    for mode in ("atomic", "semantic", "content"):
        it = ItemTokenizer.from_pretrained(tmp_path / "tok" / "items" / mode)
        assert it.item_ids == index.item_ids
    sem = ItemTokenizer.from_pretrained(tmp_path / "tok" / "items" / "semantic")
    assert len({tuple(sem.tokens(i)) for i in sem.item_ids}) == len(sem.item_ids)  # unique codes
    vq = VQTokenizer.from_pretrained(tmp_path / "tok" / "vq")
    codes = json.loads((tmp_path / "tok" / "image_codes.json").read_text())
    assert len(codes) == 80 and all(len(c) == vq.config.grid ** 2 for c in codes.values())


def test_item_layout_puts_the_identifier_before_or_after_the_image(world):
    from recfm.foundation.configuration import RecFMConfig
    from recfm.training.collate import render_context

    domain, split, tok, items, ctx = world
    item_id = next(r["item_id"] for r in domain.items if r["image_path"] is not None)
    msg = [{"role": "user", "content": [{"type": "item", "item_id": item_id, "view": "history"}]}]
    image_id, code = tok.convert_tokens_to_ids(IMAGE), items.encode(item_id)
    for id_first in (False, True):
        c = RenderContext(tokenizer=tok, item_tokenizer=items, catalogue=ctx.catalogue, image_tokens=2, id_first=id_first)
        ids = render(msg, c).input_ids
        first_image, first_code = ids.index(image_id), ids.index(code[0])
        assert (first_code < first_image) == id_first
        assert ids.count(image_id) == 2 and ids[first_code : first_code + len(code)] == code
    # the layout is the model's: it travels in its config, and old configs mean content_first
    assert RecFMConfig().item_layout == "content_first"
    with pytest.raises(ValueError, match="item_layout"):
        RecFMConfig(item_layout="sideways")

    from types import SimpleNamespace

    Tok = SimpleNamespace(text=tok, items=items, image_codes=None, image_code_offset=None)

    cfg = RecFMConfig(item_layout="id_first", vision_config={"model_type": "clip_vision_model"})
    assert render_context(Tok, domain, cfg).id_first
    assert not render_context(Tok, domain, RecFMConfig(vision_config={"model_type": "clip_vision_model"})).id_first
