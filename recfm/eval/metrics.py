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


def ranking_metrics(ranks: np.ndarray, ks=DEFAULT_KS) -> dict[str, float]:
    """HR@K, NDCG@K (one relevant item) and MRR, averaged over users."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    return out
