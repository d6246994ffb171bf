"""Example builders: (prompt, answer) conversations for every task, as `datasets` datasets.

Training examples come from the training split only: a history is a prefix of a user's training
sequence and its target the next training item. Negatives (for yes/no, image preference and
candidate lists) are drawn from items the user never interacted with, their held-out items
included, so no evaluation item of a user ever appears in that user's training prompts.
Held-out templates are never used for training. Evaluation examples come from the validation or
test examples of a split (history -> target), with every template, each tagged seen or held out.

A row: task, family, template_id, held_out, user_id, target, messages (JSON), answer (text or item),
history (the ids of every item before the target, not only the ones the prompt shows), item (the item
the prompt asks about: for yes/no a drawn negative in about half the rows, otherwise the target).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
from datasets import Dataset, Features, Value
from datasets import List as ListFeature

from ..data.domain import Domain
from ..data.splits import Split
from .templates import Template, fill, load_templates

TASKS = ("next_item", "pick_candidate", "explanation", "yes_no", "which_image", "rating", "review", "image_generation")
EXAMPLE_FEATURES = Features({
    "task": Value("string"), "family": Value("string"), "template_id": Value("string"), "held_out": Value("bool"),
    "user_id": Value("string"), "target": Value("string"), "answer": Value("string"), "messages": Value("string"),
    "history": ListFeature(Value("string")), "item": Value("string"),
})


class _Catalogue:
    def __init__(self, domain: Domain, split: Split):
        self.items = domain.item_ids
        self.with_image = {r["item_id"] for r in domain.items.select_columns(["item_id", "image_path"]) if r["image_path"]}
        self.query = {}
        for r in domain.items.select_columns(["item_id", "title", "attributes"]):
            attrs = json.loads(r["attributes"])
            self.query[r["item_id"]] = attrs.get("category") or r["title"] or "item"
        # every item a user touched in any split: never a negative for that user
        self.touched: dict[str, set[str]] = {}
        for seq in domain.sequences.select_columns(["user_id", "item_ids"]):
            self.touched[seq["user_id"]] = set(seq["item_ids"])
        # negatives come from items seen in training (an unseen item is trivially "no")
        train_items = sorted({i for s in split.train["item_ids"] for i in s})
        self.train_items = np.asarray(train_items, dtype=object)
        self.train_items_with_image = np.asarray([i for i in train_items if i in self.with_image], dtype=object)

    def negatives(self, rng: np.random.Generator, user: str, k: int, need_image: bool = False) -> list[str]:
        pool = self.train_items_with_image if need_image else self.train_items
        avoid = self.touched.get(user, set())
        out: list[str] = []
        for _ in range(50 * k):
            c = pool[int(rng.integers(len(pool)))]
            if c not in avoid and c not in out:
                out.append(c)
                if len(out) == k:
                    break
        return out


def _values(task: str, user: str, history: list[tuple[str, float | None]], target: str, rating, review, summary,
            cat: _Catalogue, rng: np.random.Generator, n_candidates: int) -> dict | None:
    """Slot values for one example, or None when this task cannot be asked of it."""
    v: dict = {"history": history, "target": target, "item": target, "query": cat.query.get(target, "item")}
    if rating is not None:
        v["rating"] = float(rating)
    if task == "pick_candidate":
        negs = cat.negatives(rng, user, n_candidates - 1)
        if len(negs) < n_candidates - 1:
            return None
        cands = negs + [target]
        rng.shuffle(cands)
        v["candidates"] = cands
    elif task in ("explanation", "review"):
        if not review:
            return None
        v["review"] = review
        if task == "review" and rating is None:
            return None
    elif task == "yes_no":
        if rng.random() < 0.5:
            v["yes_no"] = "yes" if rating is None or rating >= 4 else "no"
        else:
            negs = cat.negatives(rng, user, 1)
            if not negs:
                return None
            v["item"], v["yes_no"] = negs[0], "no"
    elif task == "which_image":
        if target not in cat.with_image:
            return None
        negs = cat.negatives(rng, user, 1, need_image=True)
        if not negs:
            return None
        if rng.random() < 0.5:
            v["image_a"], v["image_b"], v["choice"] = target, negs[0], "A"
        else:
            v["image_a"], v["image_b"], v["choice"] = negs[0], target, "B"
    elif task == "rating":
        if rating is None:
            return None
    elif task == "image_generation":
        if target not in cat.with_image:
            return None
    return v


def _answer_text(task: str, v: dict) -> str:
    return {"next_item": v["target"], "pick_candidate": v["target"], "image_generation": v["target"],
            "explanation": v.get("review"), "review": v.get("review"), "yes_no": v.get("yes_no"),
            "which_image": v.get("choice"), "rating": str(int(v["rating"])) if "rating" in v else None}[task]


def _rows(task: str, templates: Sequence[Template], source: Iterable[dict], cat: _Catalogue, rng: np.random.Generator,
          max_history: int, n_candidates: int, all_templates: bool) -> Iterable[dict]:
    for ex in source:
        hist = list(zip(ex["history"], ex["history_ratings"]))[-max_history:]
        if not hist:
            continue
        v = _values(task, ex["user_id"], hist, ex["target"], ex["target_rating"], ex["target_review"],
                    ex["target_summary"], cat, rng, n_candidates)
        if v is None:
            continue
        chosen = templates if all_templates else [templates[int(rng.integers(len(templates)))]]
        for tpl in chosen:
            if not tpl.slots <= set(v) | {"history"}:
                continue
            yield {"task": task, "family": tpl.family, "template_id": tpl.id, "held_out": tpl.held_out,
                   "user_id": ex["user_id"], "target": ex["target"], "answer": _answer_text(task, v),
                   "messages": json.dumps(fill(tpl, v)), "history": list(ex["history"]), "item": v["item"]}


def _training_points(split: Split, rng: np.random.Generator, per_user: int) -> list[dict]:
    """(history -> next item) points inside each user's training sequence; the last one always."""
    out = []
    for seq in split.train:
        n = len(seq["item_ids"])
        if n < 2:
            continue
        ts = {n - 1} | set(rng.integers(1, n, size=max(0, per_user - 1)).tolist())
        for t in sorted(ts):
            out.append({"user_id": seq["user_id"], "history": seq["item_ids"][:t], "history_ratings": seq["ratings"][:t],
                        "target": seq["item_ids"][t], "target_rating": seq["ratings"][t],
                        "target_review": seq["reviews"][t], "target_summary": seq["summaries"][t]})
    return out


def build_training_examples(domain: Domain, split: Split, tasks: Sequence[str] = TASKS, per_user: int = 3,
                            max_history: int = 20, n_candidates: int = 10, seed: int = 0) -> Dataset:
    """Training conversations for `tasks`, one seen template drawn per (point, task)."""
    templates = load_templates()
    rng = np.random.default_rng(seed)
    cat = _Catalogue(domain, split)
    points = _training_points(split, rng, per_user)
    rows = []
    for task in tasks:
        seen = [t for t in templates[task] if not t.held_out]
        rows += _rows(task, seen, points, cat, rng, max_history, n_candidates, all_templates=False)
    return Dataset.from_list(rows, features=EXAMPLE_FEATURES) if rows else Dataset.from_dict(
        {k: [] for k in EXAMPLE_FEATURES}, features=EXAMPLE_FEATURES)


def build_eval_examples(domain: Domain, split: Split, stage: str = "test", tasks: Sequence[str] = TASKS,
                        max_history: int = 20, n_candidates: int = 10, seed: int = 0,
                        max_users: int | None = None) -> Dataset:
    """Evaluation conversations from the split's `stage` examples, with every template of each task."""
    templates = load_templates()
    rng = np.random.default_rng(seed)
    cat = _Catalogue(domain, split)
    source = split.valid if stage == "valid" else split.test
    if max_users is not None:
        source = source.select(range(min(max_users, len(source))))
    rows = []
    for task in tasks:
        rows += _rows(task, templates[task], source, cat, rng, max_history, n_candidates, all_templates=True)
    return Dataset.from_list(rows, features=EXAMPLE_FEATURES)


def _row(task: str, user: str, content: list[dict], items: list[str], view: str) -> dict:
    return {"task": task, "family": "pretrain", "template_id": view, "held_out": False, "user_id": user,
            "target": items[-1], "answer": "", "messages": json.dumps([{"role": "user", "content": content}]),
            "history": items[:-1], "item": items[-1]}


def _id_sequence_rows(seq: dict, length: int, task: str, readings: int = 1) -> list[dict]:
    """One training sequence's identifier-only rows: chunks of up to `length` items from the newest end,
    read `readings` times; reading r leaves out the newest r * length // readings items, so its chunk
    borders fall elsewhere."""
    from .templates import item_part

    rows = []
    for r in range(readings):
        items = seq["item_ids"][: len(seq["item_ids"]) - r * length // readings]
        for end in range(len(items), 1, -length):
            chunk = items[max(0, end - length) : end]
            if len(chunk) >= 2:
                rows.append(_row(task, seq["user_id"], [item_part(i, "id") for i in chunk], list(chunk), "id_sequence"))
    return rows


def build_id_sequence_examples(split: Split, length: int = 50, task: str = "id_sequence") -> Dataset:
    """Each training sequence as identifiers only (`id` view, one to a few tokens an item), in chunks
    of up to `length` items cut from the newest end: the cheap view in which the context loss is
    next-item prediction at every position over long histories, as in SASRec, at a fraction of the
    multimodal view's tokens per item. Tuning replays these rows (task "id_sequence")."""
    rows = [r for seq in split.train for r in _id_sequence_rows(seq, length, task)]
    return Dataset.from_list(rows, features=EXAMPLE_FEATURES)


def build_pretraining_examples(split: Split, max_history: int = 20, seed: int = 0, id_sequence: int = 0,
                               id_readings: int = 1, history: bool = True) -> Dataset:
    """Serialized training histories, one user turn each (chunks of at most `max_history` items):
    the model learns them by next-item prediction over the item spans (the context loss). With
    `id_sequence` > 0, the identifier-only rows of `build_id_sequence_examples` come too, read
    `id_readings` times, each reading with its chunk borders shifted by `id_sequence / id_readings` items.
    `history=False` leaves the multimodal rows out: identifier-only rows alone, a cheap stage of many
    passes over the sequences, as a sequential recommender trains."""
    if not history and id_sequence <= 0:
        raise ValueError("pretraining with history=False reads identifier-only rows, so id_sequence must be > 0")
    from .templates import item_part

    rows = []
    for seq in split.train:
        items = list(zip(seq["item_ids"], seq["ratings"]))
        for start in range(0, len(items) if history else 0, max_history):
            chunk = items[start : start + max_history]
            if len(chunk) >= 2:
                rows.append(_row("pretrain", seq["user_id"], [item_part(i, "history", r) for i, r in chunk],
                                 [i for i, _ in chunk], "history"))
        if id_sequence > 0:
            rows += _id_sequence_rows(seq, id_sequence, "pretrain", id_readings)
    return Dataset.from_list(rows, features=EXAMPLE_FEATURES)
