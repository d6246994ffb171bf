"""The built-in synthetic domain: deterministic, images carry taste, the oracle is sound."""

import filecmp
import json

import numpy as np

from recfm.data import load_domain
from recfm.data.oracle import Oracle, oracle_metrics
from recfm.data.splits import leave_one_out
from recfm.data.synthetic import (COLOURS, IMAGE_ATTRS, PATTERNS, SHAPES, SyntheticConfig, check_image,
                                  draw_item_image, prepare_default)


def _same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only, (cmp.left_only, cmp.right_only)
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors, mismatch
    for sub in cmp.common_dirs:
        _same_tree(a / sub, b / sub)


def test_same_seed_gives_byte_identical_folder(tmp_path, small_default):
    cfg = SyntheticConfig(seed=3, n_items=80, n_users=120, max_length=20)
    again = prepare_default(tmp_path / "again", cfg, progress=False)
    _same_tree(small_default.path, again.path)


def test_other_seed_differs(tmp_path, small_default):
    other = prepare_default(tmp_path / "other", SyntheticConfig(seed=4, n_items=80, n_users=120, max_length=20), progress=False)
    assert other.interactions["item_id"] != small_default.interactions["item_id"]


def test_checker_recovers_every_attribute_from_pixels(small_default):
    gen = small_default.generator
    for k, iid in enumerate(small_default.item_ids):
        truth = {a: gen["attribute_values"][a][gen["item_attributes"][a][int(iid)]] for a in IMAGE_ATTRS}
        assert check_image(small_default.image(iid)) == truth, iid


def test_checker_works_at_all_sizes_and_rejects_blank_images():
    rng = np.random.default_rng(0)
    for size in (32, 48, 64, 128):
        for c in COLOURS:
            for s in SHAPES:
                for p in PATTERNS:
                    assert check_image(draw_item_image(c, s, p, size, rng)) == {"colour": c, "shape": s, "pattern": p}
    blank = np.full((32, 32, 3), 238, dtype=np.uint8)
    assert check_image(blank) == {"colour": None, "shape": None, "pattern": None}


def test_image_attributes_stay_out_of_text(small_default):
    words = set(COLOURS) | set(SHAPES) | set(PATTERNS) | {"striped", "dotted"}
    for row in small_default.items:
        text = f"{row['title']} {row['text']} {row['attributes']}".lower()
        assert not any(w in text.split() or f"{w}," in text or f"{w}." in text for w in words), text
        assert set(json.loads(row["attributes"])) == {"category", "style"}


def test_oracle_beats_text_only_oracle_and_popularity(small_default):
    report = small_default.meta["oracle"]["test"]
    full, text = report["oracle"], report["text_only_oracle"]
    assert full["ndcg@10"] > 1.5 * text["ndcg@10"]
    assert full["hr@10"] > text["hr@10"] + 0.1
    # popularity (training counts) on the same test examples
    split = leave_one_out(small_default)
    counts = np.zeros(len(small_default.item_ids))
    for seq in split.train["item_ids"]:
        for i in seq:
            counts[int(i)] += 1
    ranks = []
    for h, t in zip(split.test["history"], split.test["target"]):
        s = counts + np.arange(len(counts)) * -1e-9  # deterministic tie-break
        s[[int(i) for i in h]] = -np.inf
        ranks.append(int((s > s[int(t)]).sum()))
    pop_hr10 = float(np.mean(np.asarray(ranks) < 10))
    assert full["hr@10"] > pop_hr10 + 0.1


def test_oracle_predictive_is_a_distribution_over_unconsumed_items(small_default):
    oracle = Oracle(small_default.generator)
    history = [int(i) for i in small_default.sequences[0]["item_ids"][:5]]
    logp = oracle.scores(history)
    assert np.all(np.isneginf(logp[history]))
    assert np.isclose(np.exp(logp[np.isfinite(logp)]).sum(), 1.0)


def test_oracle_metrics_recomputed_match_domain_json(small_default):
    split = leave_one_out(load_domain(small_default.path))
    assert oracle_metrics(small_default.generator, split.test) == small_default.meta["oracle"]["test"]["oracle"]
