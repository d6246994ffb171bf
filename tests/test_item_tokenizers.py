"""Item identifiers in the three modes: codes, binding to a real tokenizer, persistence, generate."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList, PreTrainedTokenizerFast

from recfm.tokenizers.items import (
    AtomicItemTokenizer,
    ItemTokenizer,
    SemanticItemTokenizer,
    build_item_tokenizer,
    default_codebook_size,
    kmeans,
)
from recfm.tokenizers.trie import TrieLogitsProcessor, prefix_allowed_tokens_fn

N = 120
IDS = [f"item-{k:03d}" for k in range(N)]


def embeddings(n: int = N, seed: int = 0) -> np.ndarray:
    """Clustered content embeddings with a few exact duplicates, so collisions must happen."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 16))[rng.integers(0, 6, n)] + 0.3 * rng.normal(size=(n, 16))
    x[[7, 30, 31]] = x[5]
    return x.astype(np.float32)


def text_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer trained here, standing in for the backbone's."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = ["the user watched a movie", "what will this user watch next ?", "recommend an item"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


def make(mode: str) -> ItemTokenizer:
    if mode == "semantic":
        return build_item_tokenizer(IDS, mode, embeddings(), codebook_size=8)
    return build_item_tokenizer(IDS, mode)


def bound(mode: str) -> tuple[ItemTokenizer, PreTrainedTokenizerFast]:
    items, hf = make(mode), text_tokenizer()
    hf.add_tokens(items.new_tokens(), special_tokens=True)
    return items.bind(hf), hf


@pytest.mark.parametrize("mode", ["atomic", "semantic"])
def test_encode_decode_inverse_for_every_item(mode):
    items, _ = bound(mode)
    assert all(items.decode(items.encode(i)) == i for i in IDS)
    table = items.id_table
    assert len(np.unique(table, axis=0)) == N  # codes are unique
    assert items.decode([]) is None
    assert items.decode(table[0].tolist() + [table[0, -1]]) is None  # too long
    assert items.decode([int(table.max()) + 1] * table.shape[1]) is None  # not an item token
    if mode == "semantic":
        assert items.decode(table[0, :-1].tolist()) is None  # a prefix is not an item


def test_content_mode_encodes_placeholder_and_index():
    items, hf = bound("content")
    placeholder = hf.convert_tokens_to_ids("<item>")
    assert items.new_tokens() == ["<item>"] and items.placeholder_id == placeholder
    assert all(items.encode(i) == [placeholder] and items.tokens(i) == ["<item>"] for i in IDS)
    # decode takes the full-ranking head's item index
    assert all(items.decode([items.index(i)]) == i for i in IDS)
    assert items.decode([N]) is None and items.decode([-1]) is None and items.decode([0, 1]) is None
    assert items.trie.allowed([]).tolist() == [placeholder]
    assert items.add_items(["new"]) == [] and items.is_bound and items.index("new") == N
    with pytest.raises(KeyError):
        items.tokens("missing")


def test_atomic_tokens_and_new_items():
    items = AtomicItemTokenizer(IDS)
    assert items.tokens("item-007") == ["<item_7>"] and len(items.new_tokens()) == N
    items.bind({t: 1000 + k for k, t in enumerate(items.new_tokens())}.__getitem__)
    assert items.encode("item-007") == [1007]
    assert items.add_items(["a", "b"]) == [f"<item_{N}>", f"<item_{N + 1}>"]
    assert not items.is_bound
    with pytest.raises(RuntimeError):
        items.encode("a")
    items.bind({t: 1000 + k for k, t in enumerate(items.new_tokens())}.__getitem__)
    assert items.encode("b") == [1000 + N + 1] and items.decode([1000 + N + 1]) == "b"
    assert items.encode("item-007") == [1007]  # old items keep their token


def test_rejects_bad_item_ids():
    with pytest.raises(ValueError, match="duplicate"):
        AtomicItemTokenizer(["a", "b", "a"])
    with pytest.raises(TypeError):
        AtomicItemTokenizer(["a", 3])
    items = AtomicItemTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="already exist"):
        items.add_items(["c", "a"])
    assert items.item_ids == ["a", "b"]  # a failed add leaves nothing behind


def test_semantic_codes_unique_with_collisions_in_index_order():
    items = SemanticItemTokenizer.fit(IDS, embeddings(), codebook_size=8)
    codes = items.codes
    assert codes.shape == (N, 4) and len(np.unique(codes, axis=0)) == N
    # items 5, 7, 30, 31 have the same embedding: same path, collision 0, 1, 2, 3 by index
    assert (codes[[5, 7, 30, 31], :3] == codes[5, :3]).all()
    assert codes[[5, 7, 30, 31], 3].tolist() == [0, 1, 2, 3]
    assert (items.quantize(embeddings()) == codes[:, :3]).all()  # stored centroids reproduce codes
    assert items.tokens(IDS[31]) == [f"<s{lv}_{c}>" for lv, c in enumerate(codes[31])]
    usage = items.usage()
    assert usage["distinct_paths"] + usage["items_with_collision"] == N
    assert all(0 < u <= 8 for u in usage["codes_used"]) and usage["collision_size"] >= 4
    assert len(items.new_tokens()) == 3 * 8 + usage["collision_size"]


def test_semantic_deterministic_for_a_seed():
    a = SemanticItemTokenizer.fit(IDS, embeddings(), codebook_size=8, seed=3)
    b = SemanticItemTokenizer.fit(IDS, embeddings(), codebook_size=8, seed=3)
    c = SemanticItemTokenizer.fit(IDS, embeddings(), codebook_size=8, seed=4)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.codes, c.codes)


def test_semantic_add_items_gets_codes_from_content():
    items, hf = bound("semantic")
    old_codes, old_size = items.codes.copy(), items.collision_size
    x = embeddings()
    new_emb = np.stack([x[5], x[5], x[60] + 1e-4])  # two more twins of item 5, one near item 60
    added = items.add_items(["n0", "n1", "n2"], new_emb)
    assert np.array_equal(items.codes[:N], old_codes)  # existing items keep their codes
    assert len(np.unique(items.codes, axis=0)) == N + 3
    assert items.codes[N:N + 2, :3].tolist() == [old_codes[5, :3].tolist()] * 2
    assert items.codes[N:N + 2, 3].tolist() == [4, 5]  # next free collision indices
    assert (items.codes[N + 2, :3] == old_codes[60, :3]).all()
    assert added == [f"<s3_{c}>" for c in range(old_size, items.collision_size)] and len(added) == 2
    assert not items.is_bound
    hf.add_tokens(added, special_tokens=True)
    items.bind(hf)
    assert all(items.decode(items.encode(i)) == i for i in IDS + ["n0", "n1", "n2"])
    with pytest.raises(ValueError):
        items.add_items(["n3"])  # semantic ids need content


def test_default_codebook_size():
    assert default_codebook_size(1000, 3) == 32
    assert default_codebook_size(1_000_000, 3) == 128
    assert default_codebook_size(10**9, 3) == 256
    assert SemanticItemTokenizer.fit(IDS[:10], embeddings()[:10]).codebook_size == 10  # capped at n


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 8)) * 20
    truth = rng.integers(0, 4, 400)
    x = centers[truth] + rng.normal(size=(400, 8))
    _, assign = kmeans(x, 4, seed=0)
    pairs = set(zip(truth.tolist(), assign.tolist()))
    assert len(pairs) == 4  # the same partition, up to relabelling


@pytest.mark.parametrize("mode", ["atomic", "semantic", "content"])
def test_save_load_round_trip(tmp_path, mode):
    items, hf = bound(mode)
    items.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "item_tokenizer.json").read_text())
    assert config["version"] == 1 and config["mode"] == mode
    loaded = ItemTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is type(items) and loaded.item_ids == IDS and not loaded.is_bound
    assert loaded.new_tokens() == items.new_tokens()
    assert all(loaded.tokens(i) == items.tokens(i) for i in IDS)
    loaded.bind(hf)
    assert np.array_equal(loaded.id_table, items.id_table)
    if mode == "semantic":
        assert np.array_equal(loaded.codes, items.codes) and np.array_equal(loaded.centroids, items.centroids)
        new = embeddings()[[3, 9]] + 0.01
        items.add_items(["n0", "n1"], new)
        loaded.add_items(["n0", "n1"], new)
        assert np.array_equal(loaded.codes, items.codes)  # new items coded the same after reload
    other = SemanticItemTokenizer if mode != "semantic" else AtomicItemTokenizer
    with pytest.raises(ValueError):
        other.from_pretrained(tmp_path)
    config["version"] = 2
    (tmp_path / "item_tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="version"):
        ItemTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("mode", ["atomic", "semantic"])
def test_binding_to_a_real_tokenizer(mode):
    items, hf = make(mode), text_tokenizer()
    with pytest.raises(ValueError, match="not in the tokenizer"):
        items.bind(hf)  # tokens not added yet: they would all be [UNK]
    hf.add_tokens(items.new_tokens(), special_tokens=True)
    items.bind(hf)
    for item in IDS[::7]:
        ids = items.encode(item)
        assert hf.convert_ids_to_tokens(ids) == items.tokens(item)
        text = "the user watched " + "".join(items.tokens(item)) + " next"
        encoded = hf(text).input_ids
        assert encoded[3 : 3 + len(ids)] == ids  # the text tokenizer never splits item tokens
        assert items.decode(encoded[3 : 3 + len(ids)]) == item


@pytest.mark.parametrize("mode", ["atomic", "semantic"])
def test_constrained_beam_search_with_generate(mode, one_thread):
    items, hf = bound(mode)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id, bos_token_id=None,
    )
    assert config.vocab_size < 400
    model = LlamaForCausalLM(config).eval()
    hf.padding_side = "left"
    batch = hf(["what will this user watch next ?", "recommend an item"], return_tensors="pt", padding=True)
    span, length, eos = batch.input_ids.shape[1], items.id_table.shape[1], hf.eos_token_id
    common = dict(
        **batch, num_beams=4, num_return_sequences=4, do_sample=False, max_new_tokens=length + 1,
        eos_token_id=eos, pad_token_id=hf.pad_token_id,
    )
    hooks = [
        dict(logits_processor=LogitsProcessorList([TrieLogitsProcessor(items.trie, span, eos)])),
        dict(prefix_allowed_tokens_fn=prefix_allowed_tokens_fn(items.trie, span, eos)),
    ]
    for hook in hooks:
        out = model.generate(**common, **hook)[:, span:]
        assert out.shape == (8, length + 1) and (out[:, -1] == eos).all()
        found = [items.decode(row[:length]) for row in out]
        assert all(f in IDS for f in found)  # 100 % real items
        assert len(set(found[:4])) == 4 and len(set(found[4:])) == 4


# --- items as bags of words (the item encoder's words mode, the content-profile baseline) ------------


def test_word_vocabulary_keeps_shared_words_with_their_idf():
    import math

    from recfm.tokenizers.words import WordVocabulary, item_words

    texts = ["Toy Story (1995). Genres: Animation, Comedy", "Heat (1995). Genres: Action, Crime",
             "Casino (1995). Genres: Crime, Drama", "Twister (1996). Genres: Action", None]
    assert item_words(texts[0]) == {"toy", "story", "1995", "genres", "animation", "comedy"}
    vocab = WordVocabulary.from_texts(texts, min_df=2)
    # df: genres 4, 1995 3, action 2, crime 2; most frequent first, ties by spelling; words of one item are out
    assert vocab.words == ("genres", "1995", "action", "crime")
    assert vocab.idf == pytest.approx((math.log(5 / 4), math.log(5 / 3), math.log(5 / 2), math.log(5 / 2)))
    ids, weights = vocab.encode("HEAT 2: crime, crime & action (1995)", max_words=8)
    # binary term frequency, heaviest first, L2-normalised; "heat" and "2" are not in the vocabulary
    assert ids == [2, 3, 1]
    raw = [math.log(5 / 2), math.log(5 / 2), math.log(5 / 3)]
    assert weights == pytest.approx([r / math.sqrt(sum(x * x for x in raw)) for r in raw])
    assert vocab.encode("crime action 1995", max_words=2)[0] == [2, 3]  # the 2 heaviest
    assert vocab.encode("nothing shared here", max_words=8) == ([], [])
    with pytest.raises(ValueError, match="min_df"):
        WordVocabulary.from_texts(texts, min_df=0)


def test_word_vocabulary_extends_with_a_new_domains_words():
    import math

    from recfm.tokenizers.words import WordVocabulary

    old = WordVocabulary(("genres", "1995", "action"), (0.2, 0.5, 0.9))
    shop = WordVocabulary.from_texts(["red guitar", "red drum", "blue guitar action", "action drum"], min_df=2)
    assert shop.words == ("action", "drum", "guitar", "red")
    grown = old.extend(shop)
    # the old words keep their ids; the new domain's missing words follow in its order
    assert grown.words == ("genres", "1995", "action", "drum", "guitar", "red")
    # a word the new domain has takes its idf there (action: 2 of 4 items); the others keep theirs
    assert grown.idf == pytest.approx((0.2, 0.5, math.log(2), math.log(2), math.log(2), math.log(2)))
    assert old.extend(WordVocabulary((), ())) == old
    assert grown.encode("a red action drum", 8)[0] == [2, 3, 5]
