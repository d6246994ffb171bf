"""Baselines that need no training, scored on the same split and rows as the model: popularity and a
TF-IDF content profile (next item, full ranking with the history masked), the user/item bias rating
model, and two retrieved training reviews (the most similar to the request; the item's latest).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from . import metrics as M


def train_counts(split) -> Counter:
    """How often each item occurs in the split's training sequences: the popularity baselines' score."""
    return Counter(i for s in split.train["item_ids"] for i in s)


def popularity_ranks(split, rows: list[dict], catalogue: list[str]) -> list[int]:
    counts = train_counts(split)
    base = np.asarray([counts.get(i, 0) for i in catalogue], dtype=np.float64) - np.arange(len(catalogue)) * 1e-9
    pos = {i: k for k, i in enumerate(catalogue)}
    ranks = []
    for r in rows:
        s = base.copy()
        s[[pos[i] for i in r["history"]]] = -np.inf
        ranks.append(int((s > s[pos[r["target"]]]).sum()))
    return ranks


def popularity_yes_no(split, rows: list[dict]) -> dict:
    """Yes/no answered by the asked item's training popularity alone: its AUC against the rows' answers
    (a user's real next items are popular more often than drawn negatives are)."""
    counts = train_counts(split)
    return {"auc": M.auc([counts.get(r["item"], 0) for r in rows], [r["answer"] == "yes" for r in rows])}


def content_profile_ranks(domain, rows: list[dict], catalogue: list[str], among: list[int] | None = None):
    """A content-only baseline that needs no training: every item is the TF-IDF vector of the words of
    its title and text (words of two or more items), a user is the mean vector of their history, and
    items are ranked by cosine to it, the history masked. 0-based ranks of each row's target, or with
    `among` (catalogue indices) the pair (ranks, ranks among those items alone)."""
    from ..tokenizers.words import WordVocabulary

    by_id = {r["item_id"]: f"{r['title'] or ''} {r['text'] or ''}" for r in domain.items}
    texts = [by_id.get(i, "") for i in catalogue]
    vocab = WordVocabulary.from_texts(texts, min_df=2)  # the item encoder's words and weights (all of an item's)
    # the item-word matrix, sparse: one entry per (item, word) of the vocabulary, rows L2-normalised
    encoded = [vocab.encode(t, len(vocab)) for t in texts]
    item_of = np.repeat(np.arange(len(catalogue)), [len(ids) for ids, _ in encoded])
    word_of = np.asarray([k for ids, _ in encoded for k in ids], dtype=np.int64)
    weight = np.asarray([w for _, ws in encoded for w in ws], dtype=np.float64)
    starts = np.searchsorted(item_of, np.arange(len(catalogue) + 1))
    pos = {i: k for k, i in enumerate(catalogue)}
    subset = np.asarray(among if among is not None else [], dtype=np.int64)
    tie_break = -np.arange(len(catalogue)) * 1e-12  # equal scores (no shared word) in catalogue order, as popularity
    ranks, within = [], []
    for r in rows:
        h = [pos[i] for i in r["history"]]
        profile = np.zeros(len(vocab))
        for i in h:
            np.add.at(profile, word_of[starts[i]:starts[i + 1]], weight[starts[i]:starts[i + 1]] / len(h))
        s = np.bincount(item_of, weights=weight * profile[word_of], minlength=len(catalogue)) + tie_break
        s[h] = -np.inf
        t = np.asarray([pos[r["target"]]])
        ranks.append(int(M.target_ranks(s[None], t)[0]))
        if among is not None:
            within.append(int(M.ranks_within(s[None], t, subset)[0]))
    return (ranks, within) if among is not None else ranks


def bias_rating_baseline(split, rows: list[dict]) -> list[float]:
    """Global mean + user bias + item bias, from training ratings."""
    ratings = [(s["user_id"], i, r) for s in split.train for i, r in zip(s["item_ids"], s["ratings"]) if r is not None]
    if not ratings:
        return [3.0] * len(rows)
    mu = float(np.mean([r for *_, r in ratings]))
    by_item, by_user = defaultdict(list), defaultdict(list)
    for u, i, r in ratings:
        by_item[i].append(r - mu)
    bi = {i: float(np.mean(v)) for i, v in by_item.items()}
    for u, i, r in ratings:
        by_user[u].append(r - mu - bi.get(i, 0.0))
    bu = {u: float(np.mean(v)) for u, v in by_user.items()}
    return [float(np.clip(mu + bu.get(r["user_id"], 0.0) + bi.get(r["target"], 0.0), 1, 5)) for r in rows]


def _training_reviews(split) -> list[tuple[str, str, int, str]]:
    """Every non-empty training review as (user, item, time, text), in the split's order."""
    return [(s["user_id"], i, t, rv) for s in split.train for i, t, rv in zip(s["item_ids"], s["timestamps"], s["reviews"])
            if rv]


def similar_review_baseline(split, rows: list[dict]) -> list[str]:
    """The retrieval baseline of explanation and review generation: for each request (a user, an item), the
    training review of that item by another user whose words are most like the user's own training reviews
    (cosine of TF-IDF vectors, binary term frequency, words of two or more reviews; the user's profile is
    the sum of their reviews' vectors). Ties go to the most recent review. An item with no other user's
    training review searches every other user's review; a user with no review gets the item's latest."""
    from ..tokenizers.words import WordVocabulary

    reviews = _training_reviews(split)
    if not reviews:
        return [""] * len(rows)
    vocab = WordVocabulary.from_texts([rv for *_, rv in reviews], min_df=2)
    vectors = [dict(zip(*vocab.encode(rv, len(vocab)))) for *_, rv in reviews]  # L2-normalised
    by_item, by_user = defaultdict(list), defaultdict(list)
    for k, (u, i, _, _) in enumerate(reviews):
        by_item[i].append(k)
        by_user[u].append(k)
    out = []
    for r in rows:
        user = r["user_id"]
        profile: Counter = Counter()
        for k in by_user.get(user, []):
            profile.update(vectors[k])
        candidates = ([k for k in by_item.get(r["target"], []) if reviews[k][0] != user]
                      or [k for k, rv in enumerate(reviews) if rv[0] != user] or range(len(reviews)))
        best = max(candidates, key=lambda k: (sum(w * profile.get(j, 0.0) for j, w in vectors[k].items()),
                                              reviews[k][2], -k))
        out.append(reviews[best][3])
    return out


def latest_item_review_baseline(split, rows: list[dict]) -> list[str]:
    """The most recent training review of the same item, else the most common review (a weaker retrieval
    baseline that ignores who asks)."""
    latest: dict[str, tuple[int, str]] = {}
    every = Counter()
    for _, i, t, rv in _training_reviews(split):
        every[rv] += 1
        if i not in latest or t > latest[i][0]:
            latest[i] = (t, rv)
    fallback = every.most_common(1)[0][0] if every else ""
    return [latest.get(r["target"], (0, fallback))[1] for r in rows]
