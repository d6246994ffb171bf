"""Metrics against values computed by hand."""

import math

import numpy as np
import pytest

from recfm.eval import metrics as M


def test_ranks_and_ranking_metrics_by_hand():
    scores = np.array([[0.1, 0.9, 0.5, -np.inf], [3.0, 2.0, 1.0, 0.0]])
    ranks = M.target_ranks(scores, np.array([2, 3]))
    assert ranks.tolist() == [1, 3]
    m = M.ranking_metrics(ranks, ks=(1, 2, 5))
    assert m["hr@1"] == 0.0 and m["hr@2"] == 0.5 and m["hr@5"] == 1.0
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / 2)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert m["median_rank"] == 3.0  # targets 2nd and 4th: the median of ranks 2 and 4
    assert M.ranking_metrics(np.array([0, 7, 2]))["median_rank"] == 3.0


def test_ranks_within_a_subset_by_hand():
    scores = np.array([[0.1, 0.9, 0.5, 0.7, -np.inf], [3.0, 2.0, 1.0, 0.0, 5.0]])
    # row 0: target 2 (0.5) among items {2, 3, 4}: only 3 (0.7) is above; row 1: target 3 (0.0): 2 and 4 are
    assert M.ranks_within(scores, np.array([2, 3]), np.array([2, 3, 4])).tolist() == [1, 2]
    assert M.ranks_within(scores, np.array([2, 0]), np.array([0, 2])).tolist() == [0, 0]


def test_masked_items_never_outrank():
    s = np.array([[-np.inf, -np.inf, 0.0]])
    assert M.target_ranks(s, np.array([2])).tolist() == [0]


def test_rmse_mae_accuracy_auc_by_hand():
    assert M.rmse([1, 2, 3], [1, 2, 5]) == pytest.approx(math.sqrt(4 / 3))
    assert M.mae([1, 2, 3], [1, 2, 5]) == pytest.approx(2 / 3)
    assert M.accuracy(["a", "b"], ["a", "c"]) == 0.5
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs won 3 of 4
    assert M.auc([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == 0.75
    assert M.auc([1, 1], [1, 0]) == 0.5  # a tie counts half


def test_bleu_and_rouge_by_hand():
    assert M.bleu4(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert M.bleu4(["dog"], ["the cat sat on the mat"]) == pytest.approx(0.0)
    r = M.rouge(["the cat sat"], ["the cat sat on the mat"])
    # unigram overlap 3: precision 3/3, recall 3/6 -> F1 = 2/3
    assert r["rouge1"] == pytest.approx(100 * 2 / 3)
    # bigrams: pred {the cat, cat sat}, ref has both among 5 -> P 1, R 2/5, F1 = 4/7
    assert r["rouge2"] == pytest.approx(100 * 4 / 7)
    assert r["rougeL"] == pytest.approx(100 * 2 / 3)


def test_paired_test_by_hand():
    # three users, all better by 1: of the 8 sign patterns only all-plus and all-minus reach |mean| 1
    r = M.paired_test([2, 3, 4], [1, 2, 3])
    assert r["n"] == 3 and r["mean_diff"] == 1.0 and r["p_value"] == pytest.approx(2 / 8)
    # identical systems: every pattern reaches |mean| 0, so p = 1
    assert M.paired_test([0.5, 0.1], [0.5, 0.1])["p_value"] == 1.0
    # many users with a clear shift: small p, seeded and reproducible
    rng = np.random.default_rng(0)
    a, noise = rng.normal(size=400), rng.normal(scale=0.1, size=400)
    big = M.paired_test(a + 0.5, a + noise)
    assert big["p_value"] < 0.001 and big == M.paired_test(a + 0.5, a + noise)
    # no shift, only noise: not significant
    assert M.paired_test(a + noise, a - noise[::-1])["p_value"] > 0.05


def test_ndcg_per_user_matches_the_mean():
    ranks = np.array([0, 1, 9, 10, 500])
    per = M.ndcg_per_user(ranks, 10)
    assert per[0] == 1.0 and per[2] == pytest.approx(1 / math.log2(11)) and per[3] == 0.0 and per[4] == 0.0
    assert per.mean() == pytest.approx(M.ranking_metrics(ranks)["ndcg@10"])


def test_random_ranking_metrics_by_hand():
    from recfm.eval.metrics import random_ranking_metrics

    m = random_ranking_metrics([4, 2], ks=(1, 3))
    # n = 4: HR@1 1/4, HR@3 3/4; n = 2: HR@1 1/2, HR@3 1 (only two places)
    assert m["hr@1"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert m["hr@3"] == pytest.approx((3 / 4 + 1) / 2)
    d = [1.0, 1 / np.log2(3), 0.5]
    assert m["ndcg@3"] == pytest.approx((sum(d) / 4 + sum(d[:2]) / 2) / 2)
    assert m["mrr"] == pytest.approx(((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4 + (1 + 1 / 2) / 2) / 2)
    assert m["median_rank"] == pytest.approx((2.5 + 1.5) / 2)  # the middles of 4 and of 2 places
    # the same in expectation as ranking_metrics over every place the target can take
    from recfm.eval.metrics import ranking_metrics

    exact = ranking_metrics(np.arange(5), ks=(1, 3))
    assert random_ranking_metrics([5], ks=(1, 3)) == pytest.approx(exact)


def test_content_profile_baseline_by_hand():
    """TF-IDF over words of two or more items (red: a, b; apple: a, d), idf log(4 / 2) for both: a is
    (1, 1) / sqrt 2, b (1, 0), c nothing, d (0, 1). A user who had a scores b and d 1 / sqrt 2 each
    (b first, catalogue order), c 0, and a itself is masked."""
    from types import SimpleNamespace

    from recfm.eval.baselines import content_profile_ranks

    texts = {"a": "Red apple", "b": "red car", "c": "blue sky", "d": "green APPLE"}
    domain = SimpleNamespace(items=[{"item_id": i, "title": t, "text": None} for i, t in texts.items()])
    rows = [{"history": ["a"], "target": t} for t in ("b", "c", "d")]
    assert content_profile_ranks(domain, rows, list(texts)) == [0, 2, 1]
    ranks, within = content_profile_ranks(domain, rows, list(texts), among=[2, 3])
    assert ranks == [0, 2, 1] and within == [0, 1, 0]  # among c and d alone (b is not one of them)


def test_review_retrieval_baselines_by_hand():
    """Item x has two other users' reviews: u2's, the latest, shares no word with u1's reviews; u3's shares
    'warm' and 'sound'. The similar baseline answers u1 with u3's and the latest baseline with u2's; a user
    with no words in common with either (u4) gets the latest; an item nobody else reviewed (y) is answered
    from every other user's review."""
    from types import SimpleNamespace

    from recfm.eval.baselines import latest_item_review_baseline, similar_review_baseline

    train = [
        {"user_id": "u1", "item_ids": ["a", "y"], "timestamps": [1, 2], "reviews": ["warm sound here", None]},
        {"user_id": "u2", "item_ids": ["z", "x"], "timestamps": [1, 5], "reviews": ["bright amp", "loud and bright"]},
        {"user_id": "u3", "item_ids": ["x"], "timestamps": [3], "reviews": ["warm mellow sound"]},
        {"user_id": "u4", "item_ids": ["b"], "timestamps": [4], "reviews": ["cheap case"]},
    ]
    split = SimpleNamespace(train=train)
    rows = [{"user_id": "u1", "target": "x"}, {"user_id": "u4", "target": "x"}, {"user_id": "u1", "target": "y"},
            {"user_id": "u9", "target": "x"}]
    assert similar_review_baseline(split, rows) == ["warm mellow sound", "loud and bright", "warm mellow sound",
                                                    "loud and bright"]
    # y has no training review: the most common review (all once here: the first)
    assert latest_item_review_baseline(split, rows) == ["loud and bright", "loud and bright", "warm sound here",
                                                        "loud and bright"]
    assert similar_review_baseline(SimpleNamespace(train=[]), rows[:1]) == [""]


def test_popularity_yes_no_by_hand():
    """Training counts a=3, b=1, c=0. Rows: (a, yes), (b, no), (c, no), (b, yes). Positive-negative pairs:
    a>b, a>c, b>c, b=b (half): 3.5 of 4, AUC 0.875."""
    from types import SimpleNamespace

    from recfm.eval.baselines import popularity_yes_no

    split = SimpleNamespace(train={"item_ids": [["a", "b"], ["a"], ["a"]]})
    rows = [{"item": i, "answer": a} for i, a in (("a", "yes"), ("b", "no"), ("c", "no"), ("b", "yes"))]
    assert popularity_yes_no(split, rows) == {"auc": 0.875}


def test_distribution_median_by_hand():
    from recfm.eval.metrics import distribution_median

    probs = [[0.1, 0.1, 0.1, 0.2, 0.5],  # cumulative 0.1 0.2 0.3 0.5: the median is 4 (the mean 3.9)
             [0.6, 0.0, 0.0, 0.0, 0.4],  # 1, though the mean is 2.6
             [0.0, 0.0, 0.0, 0.0, 2.0]]  # unnormalised: 5
    assert distribution_median(probs, [1, 2, 3, 4, 5]).tolist() == [4.0, 1.0, 5.0]
