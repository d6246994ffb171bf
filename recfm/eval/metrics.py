"""Ranking metrics over full rankings. Pure numpy: the data layer's oracle uses them too.

A target's rank is the number of items scored strictly higher than it (0 = first). Masked items
(a user's own history) carry -inf and so never outrank a target. Ties are counted in the target's
favour only when exactly equal, which with float scores is rare; callers that produce ties on
purpose (a constant model) should break them before calling.
"""

from __future__ import annotations

import numpy as np

DEFAULT_KS = (5, 10, 20)


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """scores: (n, n_items); targets: (n,) item indices -> (n,) 0-based ranks."""
    scores = np.asarray(scores)
    t = scores[np.arange(len(targets)), targets]
    return (scores > t[:, None]).sum(1)


def ranks_within(scores: np.ndarray, targets: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """0-based ranks of the targets among the `subset` items alone (catalogue indices; each target is
    one of them): how many of those items score above it."""
    scores = np.asarray(scores)
    t = scores[np.arange(len(targets)), targets]
    return (scores[:, np.asarray(subset, dtype=np.int64)] > t[:, None]).sum(1)


def ranking_metrics(ranks: np.ndarray, ks=DEFAULT_KS) -> dict[str, float]:
    """HR@K, NDCG@K (one relevant item) and MRR, averaged over users, and the median rank of the
    target (1 = first): where HR@K is zero for every K, as for items new to a model, it still says
    how far up the ranking they got."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    out["median_rank"] = float(np.median(ranks) + 1.0)
    return out


def random_ranking_metrics(n_candidates, ks=DEFAULT_KS) -> dict[str, float]:
    """What a uniformly random ranking scores in expectation, with each user's target uniformly placed
    among their n_candidates unmasked items: HR@K = K / n, NDCG@K = sum_{r<K} 1/log2(r+2) / n,
    MRR = H_n / n, averaged over users; median rank: the median over users of the middle of their
    n places, (n + 1) / 2."""
    out = {}
    ns = np.asarray(n_candidates, dtype=np.int64)
    disc = 1.0 / np.log2(np.arange(int(ns.max())) + 2.0)
    cum_disc = np.cumsum(disc)
    harmonic = np.cumsum(1.0 / np.arange(1, int(ns.max()) + 1))
    for k in ks:
        top = np.minimum(k, ns)
        out[f"hr@{k}"] = float((top / ns).mean())
        out[f"ndcg@{k}"] = float((cum_disc[top - 1] / ns).mean())
    out["mrr"] = float((harmonic[ns - 1] / ns).mean())
    out["median_rank"] = float(np.median((ns + 1) / 2.0))
    return out


def ndcg_per_user(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Each user's NDCG@k (one relevant item), for paired comparisons."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def paired_test(a, b, n_resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Two-sided paired randomization (sign-flip) test of mean(a - b) = 0 over per-user values of two
    systems on the same users. Exact over all 2^n sign patterns when n <= 16, else `n_resamples`
    seeded random patterns (p counts the observed pattern too, so it is never 0)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean_diff": float("nan"), "p_value": float("nan")}
    observed = abs(d.mean())
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        stats = np.abs((signs * d).mean(1))
        p = float((stats >= observed - 1e-12).mean())
    else:
        signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(n_resamples, n))
        stats = np.abs((signs * d).mean(1))
        p = float((1 + (stats >= observed - 1e-12).sum()) / (n_resamples + 1))
    return {"n": n, "mean_diff": float(d.mean()), "p_value": p}


def rmse(pred, true) -> float:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    return float(np.sqrt(np.mean((pred - true) ** 2)))


def mae(pred, true) -> float:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    return float(np.mean(np.abs(pred - true)))


def distribution_median(probs, values) -> np.ndarray:
    """Each row's median of a discrete distribution over `values` (ascending): the smallest value whose
    cumulative probability reaches one half. It minimises the expected absolute error, as the mean does the
    squared error, so a rating is scored by MAE at its median and by RMSE at its mean."""
    probs, values = np.asarray(probs, dtype=np.float64), np.asarray(values, dtype=np.float64)
    cum = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
    return values[np.argmax(cum >= 0.5 - 1e-12, axis=-1)]


def accuracy(pred, true) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(true)))


def auc(scores, labels) -> float:
    """Area under the ROC curve (the probability a positive outscores a negative; ties count half)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def bleu4(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, 13a tokenisation), on a 0-100 scale."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, with stemming), on a 0-100 scale."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        s = scorer.score(r, p)
        for k in totals:
            totals[k] += s[k].fmeasure
    n = max(len(predictions), 1)
    return {k: 100.0 * v / n for k, v in totals.items()}
