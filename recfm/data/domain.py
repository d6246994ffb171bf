"""The domain format: a folder that every converter writes and everything else reads.

    DIR/
      domain.json      name, source, counts, checksum of the inputs, skipped rows, format version
      items/           Arrow (datasets.save_to_disk): item_id, title, text, attributes (JSON), image_path
      interactions/    Arrow: user_id, item_id, timestamp, rating, review, summary, sorted by
                       (user, timestamp, item) so each user's history is contiguous and in time order
      sequences/       Arrow: one row per user (user_id, item_ids, timestamps, ratings, reviews,
                       summaries), the same order; a derived view that splits are cut from
      users/           Arrow, optional: user_id, attributes (JSON)
      images/          the item images, any format PIL reads; image_path is relative to DIR

Everything goes through Hugging Face `datasets` (memory-mapped Arrow), so a domain with millions of
interactions is written and read without holding it in memory. Ties in timestamp are broken by item
id, so the order is deterministic whatever order the input file had. Ids are strings; users and items
sort "naturally" (numeric ids as numbers).

A domain is written to a temporary sibling folder and renamed into place at the end: a killed
conversion leaves no half-written domain behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
from datasets import Dataset, Features, Image, Value
from datasets import List as ListFeature
from datasets.arrow_writer import ArrowWriter
from PIL import Image as PILImage
from tqdm.auto import tqdm

from .errors import RowIssues

FORMAT_VERSION = 1
MAX_IMAGE_PIXELS = 8192 * 8192

ITEM_FEATURES = Features(
    {
        "item_id": Value("string"),
        "title": Value("string"),
        "text": Value("string"),
        "attributes": Value("string"),  # a JSON object: keys differ between domains
        "image_path": Value("string"),  # relative to the domain folder, or null
    }
)
INTERACTION_FEATURES = Features(
    {
        "user_id": Value("string"),
        "item_id": Value("string"),
        "timestamp": Value("int64"),
        "rating": Value("float32"),
        "review": Value("string"),
        "summary": Value("string"),
    }
)
SEQUENCE_FEATURES = Features(
    {
        "user_id": Value("string"),
        "item_ids": ListFeature(Value("string")),
        "timestamps": ListFeature(Value("int64")),
        "ratings": ListFeature(Value("float32")),
        "reviews": ListFeature(Value("string")),
        "summaries": ListFeature(Value("string")),
    }
)
USER_FEATURES = Features({"user_id": Value("string"), "attributes": Value("string")})


def natural_key(x: str) -> tuple:
    """Sort key that puts "2" before "10" and numeric ids before others."""
    return (0, int(x), "") if x.isdigit() else (1, 0, x)


@dataclass
class ItemRow:
    item_id: str
    title: str | None = None
    text: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    image: str | Path | PILImage.Image | None = None  # a file to copy, a drawn image, or none
    source: str = "<items>"
    line: int | None = None


@dataclass
class InteractionRow:
    user_id: str
    item_id: str
    timestamp: int
    rating: float | None = None
    review: str | None = None
    summary: str | None = None
    source: str = "<interactions>"
    line: int | None = None


@dataclass
class UserRow:
    user_id: str
    attributes: dict[str, Any] = field(default_factory=dict)


def file_checksum(paths: Iterable[Path]) -> str:
    """sha256 over the named files' bytes (and their names), in sorted order."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_image_file(path: Path) -> tuple[str, str] | None:
    """None when `path` is a readable image of sane size, else (reason, message)."""
    if not path.is_file():
        return "missing_image", f"image file {path} does not exist"
    try:
        with PILImage.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                return "unreadable_image", f"image {path} is {w}x{h}, over the {MAX_IMAGE_PIXELS} pixel limit"
            im.verify()
    except Exception as e:  # PIL raises many types for bad files
        return "unreadable_image", f"image {path} cannot be read: {type(e).__name__}: {e}"
    return None


class Domain:
    """A prepared domain folder, read through `datasets` (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "domain.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a recfm domain: it has no domain.json")
        self.meta: dict = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {self.meta.get('format_version')} is not {FORMAT_VERSION}; "
                "prepare the domain again with this version of recfm"
            )
        self.items: Dataset = datasets.load_from_disk(str(self.path / "items"))
        self.interactions: Dataset = datasets.load_from_disk(str(self.path / "interactions"))
        self.sequences: Dataset = datasets.load_from_disk(str(self.path / "sequences"))
        users = self.path / "users"
        self.users: Dataset | None = datasets.load_from_disk(str(users)) if users.exists() else None

    @property
    def name(self) -> str:
        return self.meta["name"]

    @cached_property
    def item_ids(self) -> list[str]:
        """Catalogue order (natural order of ids). Not a vocabulary order: see splits.ItemIndex."""
        return self.items["item_id"]

    @cached_property
    def _row_of(self) -> dict[str, int]:
        return {iid: i for i, iid in enumerate(self.item_ids)}

    def item(self, item_id: str) -> dict:
        row = dict(self.items[self._row_of[item_id]])
        row["attributes"] = json.loads(row["attributes"])
        return row

    def image_path(self, item_id: str) -> Path | None:
        rel = self.items[self._row_of[item_id]]["image_path"]
        return self.path / rel if rel else None

    def image(self, item_id: str) -> PILImage.Image | None:
        p = self.image_path(item_id)
        return PILImage.open(p).convert("RGB") if p else None

    def items_with_images(self) -> Dataset:
        """Items that have an image, with an `image` column decoded lazily by datasets' Image()."""
        root = str(self.path)
        ds = self.items.filter(lambda r: r["image_path"] is not None, keep_in_memory=True)
        ds = ds.map(lambda r: {"image": os.path.join(root, r["image_path"])}, keep_in_memory=True)
        return ds.cast_column("image", Image())

    @cached_property
    def generator(self) -> dict | None:
        """The generator's hidden parameters, for the built-in synthetic domain only."""
        p = self.path / "generator.json"
        return json.loads(p.read_text()) if p.exists() else None

    def __repr__(self) -> str:
        c = self.meta["counts"]
        return f"Domain({self.name!r}, users={c['users']}, items={c['items']}, interactions={c['interactions']})"


def load_domain(path: str | Path) -> Domain:
    return Domain(path)


# ----------------------------------------------------------------------------------------------
# writing


def _dataset_from_rows(rows: Iterable[dict], features: Features, path: Path) -> Dataset:
    """Stream rows into one Arrow file at `path` (not into memory) and memory-map it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with ArrowWriter(features=features, path=str(path), writer_batch_size=10_000) as writer:
        for row in rows:
            writer.write(row)
        writer.finalize()
    return Dataset.from_file(str(path))


def _save(ds: Dataset, path: Path) -> None:
    """save_to_disk, then set the fingerprint in state.json from the saved bytes, so the same data
    gives a byte-identical folder (datasets derives it from temporary paths otherwise)."""
    ds.save_to_disk(str(path), max_shard_size="500MB")
    h = hashlib.sha256()
    for f in sorted(path.glob("*.arrow")):
        h.update(f.read_bytes())
    state_path = path / "state.json"
    state = json.loads(state_path.read_text())
    state["_fingerprint"] = h.hexdigest()[:16]
    state_path.write_text(json.dumps(state, indent=2, sort_keys=True))


def _group_sequences(interactions: Dataset) -> Iterator[dict]:
    """Contiguous per-user rows of the sorted interactions become one sequence row."""
    cur: dict | None = None
    for batch in interactions.iter(batch_size=10_000):
        for u, i, t, r, rv, s in zip(
            batch["user_id"], batch["item_id"], batch["timestamp"], batch["rating"], batch["review"], batch["summary"]
        ):
            if cur is None or cur["user_id"] != u:
                if cur is not None:
                    yield cur
                cur = {"user_id": u, "item_ids": [], "timestamps": [], "ratings": [], "reviews": [], "summaries": []}
            cur["item_ids"].append(i)
            cur["timestamps"].append(t)
            cur["ratings"].append(r)
            cur["reviews"].append(rv)
            cur["summaries"].append(s)
    if cur is not None:
        yield cur


def write_domain(
    out: str | Path,
    *,
    name: str,
    source: str,
    items: Iterable[ItemRow],
    interactions: Iterable[InteractionRow],
    users: Iterable[UserRow] | None = None,
    issues: RowIssues | None = None,
    inputs: Iterable[Path] = (),
    extra_meta: dict | None = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Domain:
    """Validate rows and write a domain folder. Returns the loaded Domain.

    Bad rows go to `issues` (raise, or skip and count). Items are held in memory (the catalogue is
    needed to check every interaction's item); interactions are streamed.
    """
    out = Path(out)
    issues = issues or RowIssues()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        _write(tmp, name, source, items, interactions, users, issues, inputs, extra_meta, extra_files, progress)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if bars:
            datasets.enable_progress_bars()
    return Domain(out)


def _write(tmp, name, source, items, interactions, users, issues, inputs, extra_meta, extra_files, progress):
    cache = tmp / ".cache"
    (tmp / "images").mkdir()

    # items: validate, sort into catalogue order, copy or draw images
    catalogue: dict[str, ItemRow] = {}
    for row in tqdm(items, desc="items", unit=" items", disable=not progress):
        if not row.item_id:
            issues.bad(row.source, row.line, "malformed_row", "item row has an empty item id")
            continue
        if row.item_id in catalogue:
            issues.bad(row.source, row.line, "duplicate_item", f"item id {row.item_id!r} appears twice")
            continue
        if isinstance(row.image, (str, Path)):
            problem = check_image_file(Path(row.image))
            if problem:
                issues.bad(row.source, row.line, *problem)
                row.image = None
        catalogue[row.item_id] = row
    item_rows = []
    for n, iid in enumerate(sorted(catalogue, key=natural_key)):
        row = catalogue[iid]
        image_path = None
        if isinstance(row.image, PILImage.Image):
            image_path = f"images/{n:06d}.png"
            row.image.save(tmp / image_path, format="PNG")
        elif row.image is not None:
            image_path = f"images/{n:06d}{Path(row.image).suffix.lower() or '.img'}"
            shutil.copyfile(row.image, tmp / image_path)
        item_rows.append(
            {
                "item_id": iid,
                "title": row.title,
                "text": row.text,
                "attributes": json.dumps(row.attributes, sort_keys=True, ensure_ascii=False),
                "image_path": image_path,
            }
        )
    del catalogue
    items_ds = Dataset.from_list(item_rows, features=ITEM_FEATURES)
    known = set(items_ds["item_id"])
    _save(items_ds, tmp / "items")

    # interactions: validate while streaming to Arrow, then sort by (user, time, item)
    seen: set[int] = set()
    user_ids: set[str] = set()
    item_counts: Counter = Counter()

    def valid_rows() -> Iterator[dict]:
        for r in tqdm(interactions, desc="interactions", unit=" rows", disable=not progress):
            if r.item_id not in known:
                issues.bad(r.source, r.line, "unknown_item", f"item {r.item_id!r} is not in the catalogue")
                continue
            key = hash((r.user_id, r.item_id, r.timestamp))
            if key in seen:
                issues.bad(
                    r.source, r.line, "duplicate_interaction",
                    f"user {r.user_id!r} has item {r.item_id!r} at timestamp {r.timestamp} twice",
                )
                continue
            seen.add(key)
            user_ids.add(r.user_id)
            item_counts[r.item_id] += 1
            yield {
                "user_id": r.user_id, "item_id": r.item_id, "timestamp": r.timestamp,
                "rating": r.rating, "review": r.review, "summary": r.summary,
            }

    raw = _dataset_from_rows(valid_rows(), INTERACTION_FEATURES, cache / "raw.arrow")
    seen.clear()
    if len(raw) == 0:
        raise ValueError("no interactions left to write" + (f" ({issues.summary()})" if issues.total else ""))
    user_rank = {u: k for k, u in enumerate(sorted(user_ids, key=natural_key))}
    item_rank = {i: k for k, i in enumerate(items_ds["item_id"])}  # already in natural order
    keyed = raw.map(
        lambda b: {"_u": [user_rank[u] for u in b["user_id"]], "_i": [item_rank[i] for i in b["item_id"]]},
        batched=True, batch_size=50_000, cache_file_name=str(cache / "keyed.arrow"),
    )
    ordered = keyed.sort(["_u", "timestamp", "_i"], indices_cache_file_name=str(cache / "sorted.arrow"))
    ordered = ordered.remove_columns(["_u", "_i"]).flatten_indices(cache_file_name=str(cache / "flat.arrow"))
    _save(ordered, tmp / "interactions")
    sequences = _dataset_from_rows(_group_sequences(ordered), SEQUENCE_FEATURES, cache / "seq.arrow")
    _save(sequences, tmp / "sequences")

    n_users_with_attrs = 0
    if users is not None:
        user_rows = sorted(
            ({"user_id": u.user_id, "attributes": json.dumps(u.attributes, sort_keys=True)} for u in users),
            key=lambda r: natural_key(r["user_id"]),
        )
        n_users_with_attrs = len(user_rows)
        _save(Dataset.from_list(user_rows, features=USER_FEATURES), tmp / "users")

    lengths = pc.list_value_length(sequences.data.column("item_ids"))
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": source,
        "counts": {
            "users": len(user_rank),
            "items": len(items_ds),
            "interactions": len(ordered),
            "items_with_image": sum(p is not None for p in items_ds["image_path"]),
            "items_with_interactions": len(item_counts),
            "interactions_with_review": int(pc.sum(pc.greater(pc.utf8_length(ordered.data.column("review")), 0)).as_py() or 0),
            "users_with_attributes": n_users_with_attrs,
            "min_sequence_length": int(pc.min(lengths).as_py()),
        },
        "inputs_sha256": file_checksum(inputs) if inputs else None,
        "skipped": issues.report(),
    }
    if extra_meta:
        meta.update(extra_meta)
    for fname, text in (extra_files or {}).items():
        (tmp / fname).write_text(text)
    (tmp / "domain.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(cache)
