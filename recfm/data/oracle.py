"""The default domain's oracle: the Bayes-optimal next-item ranking given a history.

The generator draws each user's persona from a prior and each next item from a softmax over the
unconsumed items (persona utility + popularity + a pull towards the previous item). Given a history,
the posterior over personas follows exactly from the likelihood of the history's items in order,
and the predictive distribution of the next item is the posterior mixture of the personas' softmaxes.
Ranking items by it is the best any model can do in expectation (HR@K is maximised by the K most
probable items).

The text-only oracle runs the same computation in a world where the image attributes are invisible:
utilities and dynamics keep only the text attributes (category, style) and popularity. It is the
reference for "a model that ignores images": the gap between the two is what images are worth.
"""

from __future__ import annotations

import numpy as np

from ..eval.metrics import ranking_metrics, target_ranks
from .synthetic import IMAGE_ATTRS, TEXT_ATTRS, SyntheticConfig, bonuses, persona_scores, world_from_hidden


class Oracle:
    """Scores next items for histories of item indices under the generator (or its text-only view).

    Works in probability space: exp(utility) is precomputed per persona, so a step's normaliser over
    the unconsumed items is one matrix-vector product instead of a masked log-sum-exp.
    """

    def __init__(self, hidden: dict, text_only: bool = False):
        world = world_from_hidden(hidden)
        cfg = SyntheticConfig(**hidden["config"])
        attrs = tuple(TEXT_ATTRS) if text_only else tuple(TEXT_ATTRS) + tuple(IMAGE_ATTRS)
        static = persona_scores(world, attrs)  # (K, N)
        self.log_e = static - static.max(1, keepdims=True)
        self.e = np.exp(self.log_e)
        self.log_prior = np.log(world["persona_prior"])
        self.bonus = bonuses(cfg, attrs)
        self.attr_values = {a: world["attrs"][a] for a in self.bonus}

    def _exp_bonus(self, prev: int | None) -> np.ndarray:
        b = np.zeros(self.e.shape[1])
        if prev is not None:
            for a, v in self.bonus.items():
                vals = self.attr_values[a]
                b += v * (vals == vals[prev])
        return np.exp(b)

    def scores(self, history: list[int]) -> np.ndarray:
        """(N,) log-probabilities of each item being next; consumed items get -inf."""
        avail = np.ones(self.e.shape[1])
        log_post = self.log_prior.copy()
        prev = None
        for i in history:
            b = self._exp_bonus(prev)
            z = self.e @ (avail * b)  # (K,) normaliser over unconsumed items
            log_post += self.log_e[:, i] + np.log(b[i]) - np.log(z)
            avail[i] = 0.0
            prev = i
        post = np.exp(log_post - log_post.max())
        post /= post.sum()
        v = avail * self._exp_bonus(prev)
        z = self.e @ v
        p = ((post / z) @ self.e) * v
        with np.errstate(divide="ignore"):
            return np.log(p)


def oracle_metrics(hidden: dict, examples, text_only: bool = False) -> dict[str, float]:
    """Full-ranking metrics of the oracle on evaluation examples (rows with `history`, `target`)."""
    oracle = Oracle(hidden, text_only=text_only)
    histories, targets = examples["history"], examples["target"]
    scores = np.stack([oracle.scores([int(i) for i in h]) for h in histories])
    ranks = target_ranks(scores, np.asarray([int(t) for t in targets]))
    return ranking_metrics(ranks)


def oracle_report(domain) -> dict:
    """Oracle and text-only oracle metrics on the leave-one-out validation and test examples."""
    from .splits import leave_one_out

    split = leave_one_out(domain)
    hidden = domain.generator
    out = {}
    for name, ds in (("valid", split.valid), ("test", split.test)):
        out[name] = {
            "oracle": oracle_metrics(hidden, ds),
            "text_only_oracle": oracle_metrics(hidden, ds, text_only=True),
        }
    return out
