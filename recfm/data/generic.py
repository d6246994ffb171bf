"""A user's own data to the domain format: interactions and items as CSV or JSONL, plus an image folder.

Interactions come either as one row per event (user, item, timestamp, optional rating/review/summary)
or, in JSONL, as one row per user with a list of items in consumption order (and optionally a list
of timestamps, which must then not decrease). Column names are mapped by `Columns`. Timestamps may be
Unix seconds or ISO 8601 dates. Items' extra columns become attributes; the image column names a file
relative to the image folder (or the items file's folder). Without an items file, the catalogue is
the set of items seen in interactions, with no text.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .domain import InteractionRow, ItemRow, write_domain
from .errors import RowIssues


@dataclass
class Columns:
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    rating: str = "rating"
    review: str = "review"
    summary: str = "summary"
    items_list: str = "items"  # JSONL sequence rows: the list of items
    timestamps_list: str = "timestamps"
    item_id: str = "item_id"  # items file
    title: str = "title"
    text: str = "text"
    image: str = "image"


def _rows(path: Path, issues: RowIssues) -> Iterator[tuple[int, dict]]:
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    issues.bad(path, lineno, "malformed_row", f"not valid JSON: {e.msg}")
                    continue
                if not isinstance(rec, dict):
                    issues.bad(path, lineno, "malformed_row", "expected a JSON object")
                    continue
                yield lineno, rec
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            for rec in reader:
                lineno = reader.line_num
                if None in rec or any(v is None for v in rec.values()):
                    issues.bad(path, lineno, "malformed_row",
                               f"expected {len(reader.fieldnames or [])} columns ({', '.join(reader.fieldnames or [])})")
                    continue
                yield lineno, rec
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")


def parse_timestamp(value) -> int:
    """Unix seconds (int, float or digits) or an ISO 8601 date/time (UTC unless it says otherwise)."""
    if isinstance(value, bool) or value is None or value == "":
        raise ValueError("empty")
    if isinstance(value, (int, float)):
        t = int(value)
    else:
        s = str(value).strip()
        try:
            t = int(float(s))
        except ValueError:
            dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            t = int(dt.timestamp())
    if t < 0:
        raise ValueError("negative")
    return t


def _opt_float(v):
    return None if v is None or v == "" else float(v)


def _opt_str(v):
    return None if v is None or v == "" else str(v)


def _interactions(path: Path, c: Columns, issues: RowIssues) -> Iterator[InteractionRow]:
    for lineno, rec in _rows(path, issues):
        user = rec.get(c.user)
        if user in (None, ""):
            issues.bad(path, lineno, "malformed_row", f"missing user column {c.user!r}")
            continue
        if c.items_list in rec:  # a whole sequence in one row
            items = rec[c.items_list]
            stamps = rec.get(c.timestamps_list)
            if not isinstance(items, list) or (stamps is not None and (not isinstance(stamps, list) or len(stamps) != len(items))):
                issues.bad(path, lineno, "malformed_row", f"{c.items_list!r} must be a list (and {c.timestamps_list!r} one of the same length)")
                continue
            try:
                ts = [parse_timestamp(t) for t in stamps] if stamps is not None else list(range(len(items)))
            except ValueError as e:
                issues.bad(path, lineno, "bad_timestamp", f"bad timestamp in {c.timestamps_list!r}: {e}")
                continue
            back = next((k for k in range(1, len(ts)) if ts[k] < ts[k - 1]), None)
            if back is not None:
                issues.bad(path, lineno, "non_monotonic_timestamp",
                           f"user {user!r}: timestamp {ts[back]} at position {back} is earlier than {ts[back - 1]} before it")
                continue
            for k, (item, t) in enumerate(zip(items, ts)):
                yield InteractionRow(user_id=str(user), item_id=str(item), timestamp=t, source=str(path), line=lineno)
            continue
        item = rec.get(c.item)
        if item in (None, ""):
            issues.bad(path, lineno, "malformed_row", f"missing item column {c.item!r}")
            continue
        try:
            t = parse_timestamp(rec.get(c.timestamp))
        except ValueError:
            issues.bad(path, lineno, "bad_timestamp",
                       f"timestamp {rec.get(c.timestamp)!r} in column {c.timestamp!r} is not Unix seconds or an ISO 8601 date")
            continue
        try:
            rating = _opt_float(rec.get(c.rating))
        except (TypeError, ValueError):
            issues.bad(path, lineno, "bad_rating", f"rating {rec.get(c.rating)!r} is not a number")
            continue
        yield InteractionRow(user_id=str(user), item_id=str(item), timestamp=t, rating=rating,
                             review=_opt_str(rec.get(c.review)), summary=_opt_str(rec.get(c.summary)),
                             source=str(path), line=lineno)


def _items(path: Path, c: Columns, image_dir: Path | None, issues: RowIssues) -> Iterator[ItemRow]:
    base = image_dir or path.parent
    known = {c.item_id, c.title, c.text, c.image}
    for lineno, rec in _rows(path, issues):
        iid = rec.get(c.item_id)
        if iid in (None, ""):
            issues.bad(path, lineno, "malformed_row", f"missing item id column {c.item_id!r}")
            continue
        img = rec.get(c.image)
        image = None
        if img not in (None, ""):
            p = Path(str(img))
            image = p if p.is_absolute() else base / p
        attrs = {k: v for k, v in rec.items() if k not in known and v not in (None, "")}
        yield ItemRow(item_id=str(iid), title=_opt_str(rec.get(c.title)), text=_opt_str(rec.get(c.text)),
                      attributes=attrs, image=image, source=str(path), line=lineno)


def _pick(folder: Path, stem: str) -> Path | None:
    for suffix in (".jsonl", ".csv", ".tsv", ".json", ".ndjson"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def prepare_generic(out: str | Path, *, input_dir: str | Path | None = None, interactions: str | Path | None = None,
                    items: str | Path | None = None, images: str | Path | None = None, columns: Columns | None = None,
                    name: str | None = None, skip_bad_rows: bool = False, overwrite: bool = False, progress: bool = True):
    """Import your own data. Either `input_dir` (with interactions.{csv,jsonl}, items.{csv,jsonl}, images/)
    or explicit file paths."""
    c = columns or Columns()
    if input_dir is not None:
        folder = Path(input_dir)
        interactions = interactions or _pick(folder, "interactions")
        items = items or _pick(folder, "items")
        if images is None and (folder / "images").is_dir():
            images = folder / "images"
    if interactions is None:
        raise FileNotFoundError("no interactions file: pass --interactions FILE or an --input folder with interactions.csv/.jsonl")
    ipath = Path(interactions)
    if not ipath.is_file():
        raise FileNotFoundError(f"interactions file {ipath} does not exist")
    issues = RowIssues(skip=skip_bad_rows)
    image_dir = Path(images) if images else None
    inputs = [ipath]
    if items is not None:
        item_rows = list(_items(Path(items), c, image_dir, issues))
        inputs.append(Path(items))
    else:  # the catalogue is whatever the interactions mention
        seen = {}
        for r in _interactions(ipath, c, RowIssues(skip=True)):
            seen.setdefault(r.item_id, ItemRow(item_id=r.item_id, source=str(ipath)))
        item_rows = list(seen.values())
    return write_domain(
        out, name=name or ipath.parent.name or "generic", source=f"generic import ({ipath})", items=item_rows,
        interactions=_interactions(ipath, c, issues), issues=issues, inputs=inputs, overwrite=overwrite, progress=progress,
    )
