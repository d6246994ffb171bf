"""Amazon review data (McAuley et al., 5-core JSON lines, gzip or not) to the domain format.

Each review becomes an interaction with its rating, text and summary. The 5-core files have no item
metadata, so an item's text is built from the summaries of its reviews, but only from reviews that
fall in the training part of the leave-one-out split (not a user's last two): otherwise the text a
model reads about an item would quote the very review it is asked to generate at test time. With a
metadata file (JSON lines, or the original Python-literal lines) the title and description come from
it instead, and an `--images` folder of `<asin>.<ext>` files gives item images.
"""

from __future__ import annotations

import ast
import gzip
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from .domain import InteractionRow, ItemRow, write_domain
from .errors import RowIssues

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
MAX_SUMMARIES_IN_TEXT = 8


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _records(path: Path, issues: RowIssues) -> Iterator[tuple[int, dict]]:
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                try:  # the original metadata files are Python literals, not JSON
                    rec = ast.literal_eval(line)
                except (ValueError, SyntaxError) as e:
                    issues.bad(path, lineno, "malformed_row", f"not a JSON object: {e}")
                    continue
            if not isinstance(rec, dict):
                issues.bad(path, lineno, "malformed_row", f"expected a JSON object, got {type(rec).__name__}")
                continue
            yield lineno, rec


def _find_reviews(input_path: Path) -> Path:
    if input_path.is_file():
        return input_path
    found = sorted(input_path.glob("reviews_*.json*")) + sorted(input_path.glob("*/reviews_*.json*"))
    if not found:
        raise FileNotFoundError(f"no reviews_*.json(.gz) file in {input_path}")
    return found[0]


def _parse_review(path: Path, lineno: int, rec: dict, issues: RowIssues) -> InteractionRow | None:
    missing = [k for k in ("reviewerID", "asin", "overall", "unixReviewTime") if rec.get(k) in (None, "")]
    if missing:
        issues.bad(path, lineno, "malformed_row", f"missing field(s) {', '.join(missing)}")
        return None
    try:
        rating = float(rec["overall"])
    except (TypeError, ValueError):
        issues.bad(path, lineno, "bad_rating", f"rating {rec['overall']!r} is not a number")
        return None
    ts = rec["unixReviewTime"]
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
        issues.bad(path, lineno, "bad_timestamp", f"unixReviewTime {ts!r} is not a non-negative integer")
        return None
    return InteractionRow(
        user_id=str(rec["reviewerID"]), item_id=str(rec["asin"]), timestamp=ts, rating=rating,
        review=rec.get("reviewText") or None, summary=rec.get("summary") or None, source=str(path), line=lineno,
    )


def prepare_amazon(input_path: str | Path, out: str | Path, metadata: str | Path | None = None,
                   images: str | Path | None = None, skip_bad_rows: bool = False, overwrite: bool = False,
                   progress: bool = True):
    """Convert an Amazon reviews file (5-core JSON lines) into a domain."""
    path = _find_reviews(Path(input_path))
    issues = RowIssues(skip=skip_bad_rows)
    reviews = [r for lineno, rec in _records(path, issues) if (r := _parse_review(path, lineno, rec, issues))]

    # which reviews are a user's last two (held out by leave-one-out): never quoted in item text
    by_user: dict[str, list[InteractionRow]] = defaultdict(list)
    for r in reviews:
        by_user[r.user_id].append(r)
    held_out = set()
    for rows in by_user.values():
        rows.sort(key=lambda r: (r.timestamp, r.item_id))
        if len(rows) >= 3:
            held_out.update(id(r) for r in rows[-2:])
    summaries: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for r in reviews:
        if id(r) not in held_out and r.summary:
            summaries[r.item_id].append((r.timestamp, r.summary))

    meta: dict[str, dict] = {}
    inputs = [path]
    if metadata:
        mpath = Path(metadata)
        inputs.append(mpath)
        for lineno, rec in _records(mpath, issues):
            if rec.get("asin"):
                meta[str(rec["asin"])] = rec
    image_dir = Path(images) if images else None

    def items() -> Iterator[ItemRow]:
        for asin in sorted({r.item_id for r in reviews}):
            m = meta.get(asin, {})
            said = [s for _, s in sorted(summaries.get(asin, []))][:MAX_SUMMARIES_IN_TEXT]
            if m.get("description") or m.get("title"):
                text = " ".join(x for x in (m.get("title"), m.get("description")) if x)
            else:
                text = ("Reviewers said: " + "; ".join(f'"{s}"' for s in said) + ".") if said else None
            attrs = {k: m[k] for k in ("categories", "brand", "price") if k in m}
            image = None
            if image_dir is not None:
                image = next((image_dir / f"{asin}{s}" for s in IMAGE_SUFFIXES if (image_dir / f"{asin}{s}").exists()), None)
            if m.get("image_path"):
                image = (mpath.parent / m["image_path"]) if not Path(m["image_path"]).is_absolute() else Path(m["image_path"])
            yield ItemRow(item_id=asin, title=m.get("title"), text=text, attributes=attrs, image=image, source=str(path))

    name = path.name.split(".")[0].removeprefix("reviews_").replace("_5", "").lower().replace("_", "-")
    return write_domain(
        out, name=f"amazon-{name}", source=f"Amazon reviews ({path})", items=items(), interactions=iter(reviews),
        issues=issues, inputs=inputs, overwrite=overwrite, progress=progress,
        extra_meta={"item_text": "metadata" if meta else "summaries of training-split reviews"},
    )
