"""Splits that cannot leak, and the item index that is built from training data only.

Leave-one-out by time, per user: the last interaction is the test target, the second-to-last the
validation target, the rest is training. A test example's history is everything before its target
(so it includes the validation item); a validation example's history is the training part. Users
with fewer than 3 interactions contribute training data only (there is nothing to hold out without
emptying their history).

Cold items: a seeded random subset of the catalogue that never appears in training. The cold split
keeps every user's sequence with the cold items removed as training data, and evaluates, for each
user who consumed a cold item after at least one warm item, the first such cold item from the warm
items before it.

The item index (the vocabulary order of atomic item tokens and of the full-ranking head) is a
function of the catalogue and the training split alone: training items by training popularity, ties
by id, then items never seen in training by id. It can never follow the order in which test users
consumed items.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Value
from datasets import List as ListFeature

from .domain import SEQUENCE_FEATURES, Domain, natural_key

EXAMPLE_FEATURES = Features(
    {
        "user_id": Value("string"),
        "history": ListFeature(Value("string")),
        "history_timestamps": ListFeature(Value("int64")),
        "history_ratings": ListFeature(Value("float32")),
        "target": Value("string"),
        "target_timestamp": Value("int64"),
        "target_rating": Value("float32"),
        "target_review": Value("string"),
        "target_summary": Value("string"),
    }
)


def _dataset(rows: list[dict], features: Features) -> Dataset:
    """from_list that also works for an empty list."""
    return Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


@dataclass
class Split:
    """train: one row per user (SEQUENCE_FEATURES), truncated before the held-out items.
    valid, test: one row per evaluated user (EXAMPLE_FEATURES)."""

    train: Dataset
    valid: Dataset
    test: Dataset
    cold_items: tuple[str, ...] = ()

    def sizes(self) -> dict[str, int]:
        return {
            "train_users": len(self.train),
            "train_interactions": int(sum(len(x) for x in self.train["item_ids"])),
            "valid": len(self.valid),
            "test": len(self.test),
        }


def _example(seq: dict, t: int, history_end: int | None = None) -> dict:
    end = t if history_end is None else history_end
    return {
        "user_id": seq["user_id"],
        "history": seq["item_ids"][:end],
        "history_timestamps": seq["timestamps"][:end],
        "history_ratings": seq["ratings"][:end],
        "target": seq["item_ids"][t],
        "target_timestamp": seq["timestamps"][t],
        "target_rating": seq["ratings"][t],
        "target_review": seq["reviews"][t],
        "target_summary": seq["summaries"][t],
    }


def _truncate(seq: dict, keep) -> dict:
    return {k: (v if k == "user_id" else [x for x, m in zip(v, keep) if m]) for k, v in seq.items()}


def _loo_batch(batch: dict) -> dict:
    out = {"train": [], "valid": [], "test": []}
    for values in zip(*batch.values()):
        seq = dict(zip(batch.keys(), values))
        n = len(seq["item_ids"])
        if n < 3:
            out["train"].append(seq)
            continue
        out["train"].append({k: (v if k == "user_id" else v[: n - 2]) for k, v in seq.items()})
        out["valid"].append(_example(seq, n - 2))
        out["test"].append(_example(seq, n - 1))
    return out


def leave_one_out(domain: Domain) -> Split:
    """Last item test, second-to-last validation, the rest training, per user by time."""
    train, valid, test = [], [], []
    for batch in domain.sequences.iter(batch_size=5_000):
        parts = _loo_batch(batch)
        train += parts["train"]
        valid += parts["valid"]
        test += parts["test"]
    return Split(
        train=_dataset(train, features=SEQUENCE_FEATURES),
        valid=_dataset(valid, features=EXAMPLE_FEATURES),
        test=_dataset(test, features=EXAMPLE_FEATURES),
    )


def choose_cold_items(domain: Domain, fraction: float = 0.05, seed: int = 0) -> tuple[str, ...]:
    """A seeded random subset of the items that have interactions, in natural id order."""
    counts = Counter(domain.interactions["item_id"])
    candidates = sorted(counts, key=natural_key)
    k = max(1, int(round(fraction * len(candidates))))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(candidates), size=k, replace=False)
    return tuple(sorted((candidates[i] for i in chosen), key=natural_key))


def cold_item_split(domain: Domain, fraction: float = 0.05, seed: int = 0) -> Split:
    """Cold items never appear in train; test asks for a user's first cold item from the warm items before it.

    valid is empty: choose hyperparameters on the leave-one-out validation split.
    """
    cold = choose_cold_items(domain, fraction, seed)
    cold_set = set(cold)
    train, test = [], []
    for seq in domain.sequences:
        is_cold = [i in cold_set for i in seq["item_ids"]]
        train.append(_truncate(seq, [not c for c in is_cold]))
        first = next((t for t, c in enumerate(is_cold) if c), None)
        if first is None:
            continue
        warm_before = [not c for c in is_cold[:first]] + [False] * (len(is_cold) - first)
        if not any(warm_before):
            continue
        warm_seq = _truncate(seq, warm_before)
        ex = _example(seq, first)
        ex.update(
            history=warm_seq["item_ids"],
            history_timestamps=warm_seq["timestamps"],
            history_ratings=warm_seq["ratings"],
        )
        test.append(ex)
    return Split(
        train=_dataset(train, features=SEQUENCE_FEATURES),
        valid=_dataset([], EXAMPLE_FEATURES),
        test=_dataset(test, features=EXAMPLE_FEATURES),
        cold_items=cold,
    )


SPLITS = ("leave_one_out", "cold_items")


def make_split(domain: Domain, name: str = "leave_one_out", cold_fraction: float = 0.05, cold_seed: int = 0) -> Split:
    """The split a run trains or is evaluated on, by name (training configs and `recfm eval --split`)."""
    if name == "leave_one_out":
        return leave_one_out(domain)
    if name == "cold_items":
        return cold_item_split(domain, cold_fraction, cold_seed)
    raise ValueError(f"unknown split {name!r}; use one of {SPLITS}")


class ItemIndex:
    """Item id <-> integer index (vocabulary order), built from the training split only."""

    VERSION = 1

    def __init__(self, item_ids: list[str], n_train_items: int):
        self.item_ids = list(item_ids)
        self.n_train_items = n_train_items  # the first n_train_items were seen in training
        self.index = {iid: k for k, iid in enumerate(self.item_ids)}
        if len(self.index) != len(self.item_ids):
            raise ValueError("duplicate item ids in an ItemIndex")

    @classmethod
    def from_training(cls, train: Dataset, catalogue: list[str]) -> ItemIndex:
        counts: Counter = Counter()
        for batch in train.iter(batch_size=10_000):
            for items in batch["item_ids"]:
                counts.update(items)
        unknown = set(counts) - set(catalogue)
        if unknown:
            raise ValueError(f"training data has {len(unknown)} items missing from the catalogue, e.g. {sorted(unknown)[:3]}")
        seen = sorted(counts, key=lambda i: (-counts[i], natural_key(i)))
        unseen = sorted((i for i in catalogue if i not in counts), key=natural_key)
        return cls(seen + unseen, n_train_items=len(seen))

    def __len__(self) -> int:
        return len(self.item_ids)

    def __getitem__(self, item_id: str) -> int:
        return self.index[item_id]

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.index

    def save(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps({"version": self.VERSION, "n_train_items": self.n_train_items, "item_ids": self.item_ids}) + "\n"
        )

    @classmethod
    def load(cls, path: str | Path) -> ItemIndex:
        d = json.loads(Path(path).read_text())
        if d.get("version") != cls.VERSION:
            raise ValueError(f"{path}: item index version {d.get('version')} is not {cls.VERSION}")
        return cls(d["item_ids"], d["n_train_items"])
