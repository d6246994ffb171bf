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
