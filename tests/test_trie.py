"""PrefixTrie and the constrained-decoding hooks for transformers' generate."""

import itertools

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from recfm.tokenizers.trie import PrefixTrie, TrieLogitsProcessor, prefix_allowed_tokens_fn

CODES = [[5, 1, 9], [5, 1, 3], [5, 2, 0], [7, 4, 4]]


def test_allowed_lookup_on_hand_built_codes():
    trie = PrefixTrie(np.array(CODES))
    assert trie.allowed([]).tolist() == [5, 7]
    assert trie.allowed([5]).tolist() == [1, 2]
    assert trie.allowed([5, 1]).tolist() == [3, 9]  # sorted, whatever the input order
    assert trie.allowed([7, 4]).tolist() == [4]
    assert trie.allowed([5, 1, 9]).tolist() == []  # complete
    assert trie.allowed([6]).tolist() == [] and trie.allowed([5, 1, 9, 0]).tolist() == []  # invalid
    assert [trie.lookup(c) for c in CODES] == [0, 1, 2, 3]
    assert trie.lookup([5, 1]) is None and trie.lookup([5, 1, 4]) is None and trie.lookup([]) is None
    assert trie.is_complete([5, 2, 0]) and not trie.is_complete([5, 2])
    with pytest.raises(ValueError):
        trie.allowed([5])[0] = 1  # results are views into the trie: read-only


def test_variable_length_codes():
    trie = PrefixTrie([[3], [1, 2], [1, 0, 4], [2, 2, 2, 2]])
    assert trie.allowed([]).tolist() == [1, 2, 3]
    assert trie.allowed([1]).tolist() == [0, 2]
    assert trie.allowed([3]).tolist() == []
    assert trie.lookup([3]) == 0 and trie.lookup([1, 0, 4]) == 2 and trie.lookup([2, 2, 2, 2]) == 3
    assert trie.lookup([2, 2]) is None


@pytest.mark.parametrize("codes", [[[1, 2], [1, 2]], [[1, 2], [1, 2, 3]], [[1, 2, 3], [1, 2]], [[1, -1]]])
def test_rejects_duplicate_prefix_and_negative_codes(codes):
    with pytest.raises(ValueError):
        PrefixTrie(codes)


def test_matches_brute_force_on_random_codes():
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 4, size=(300, 5)), axis=0)  # dense: lots of shared prefixes
    codes = codes[rng.permutation(len(codes))]
    trie = PrefixTrie(codes)
    children: dict[tuple, set] = {}
    for row in codes.tolist():
        for d in range(len(row)):
            children.setdefault(tuple(row[:d]), set()).add(row[d])
    for d in range(6):
        for prefix in itertools.product(range(5), repeat=d):  # includes invalid token 4
            assert trie.allowed(prefix).tolist() == sorted(children.get(prefix, ())), prefix
    assert all(trie.lookup(row) == i for i, row in enumerate(codes.tolist()))
    assert trie.n_nodes == len(children) + len(codes)  # the root and inner prefixes, then leaves


def test_logits_processor_masks_each_row():
    trie = PrefixTrie(CODES + [[8, 8]])
    eos = 11
    prompt = [[0, 8], [8, 8], [0, 0], [2, 2]]
    generated = [[5, 1], [8, 8], [6, 0], [7, 4]]  # partial, complete, invalid, partial
    input_ids = torch.tensor([p + g for p, g in zip(prompt, generated)])
    scores = torch.randn(4, 12)
    out = TrieLogitsProcessor(trie, span_start=2, end_token_id=eos)(input_ids, scores.clone())
    finite = [torch.isfinite(row).nonzero().flatten().tolist() for row in out]
    assert finite == [[3, 9], [eos], [eos], [4]]
    assert torch.equal(out[0, [3, 9]], scores[0, [3, 9]])  # allowed scores are untouched
    fn = prefix_allowed_tokens_fn(trie, span_start=2, end_token_id=eos)
    assert [fn(0, row) for row in input_ids] == finite


def _tiny_llama(vocab: int, eos: int, pad: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=eos, pad_token_id=pad, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def test_constrained_beam_search_returns_only_real_items(one_thread):
    rng = np.random.default_rng(0)
    vocab, eos, pad = 300, 1, 0
    # 50 items, 3 levels of 8 tokens each in disjoint id ranges, like semantic ids
    flat = rng.choice(8**3, size=50, replace=False)
    codes = np.stack([flat // 64, flat // 8 % 8, flat % 8], axis=1) + np.array([100, 120, 140])
    trie = PrefixTrie(codes)
    model = _tiny_llama(vocab, eos, pad)
    prompts = torch.tensor([[0, 0, 5, 6, 7], [9, 10, 11, 12, 13]])  # left-padded batch of 2
    mask = (prompts != pad).long()
    span = prompts.shape[1]
    common = dict(
        input_ids=prompts, attention_mask=mask, num_beams=4, num_return_sequences=4, do_sample=False,
        max_new_tokens=codes.shape[1] + 1, eos_token_id=eos, pad_token_id=pad,
    )
    free = model.generate(**common)
    assert sum(trie.lookup(r[span : span + 3].tolist()) is not None for r in free) < len(free)
    processor = LogitsProcessorList([TrieLogitsProcessor(trie, span, eos)])
    outs = [
        model.generate(**common, logits_processor=processor),
        model.generate(**common, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn(trie, span, eos)),
    ]
    assert torch.equal(outs[0], outs[1])  # the two hooks impose the same constraint
    for out in outs:
        assert out.shape == (8, span + 4)
        assert (out[:, -1] == eos).all()  # the end token comes right after a complete code
        found = [trie.lookup(r[span : span + 3].tolist()) for r in out]
        assert None not in found
        for b in range(2):  # beams of one prompt are different items
            assert len(set(found[4 * b : 4 * b + 4])) == 4
