"""MovieLens 100K (and 1M) to the domain format, with posters joined by title and year.

The posters are keyed by MovieLens-1M movie ids, the 100K ratings by 100K ids; the two releases
share titles. A title is normalised (a trailing article such as ", The" moved to the front, case and
punctuation folded), then matched by (title, year), then with alternative titles in parentheses
removed, then with the year off by one. Unmatched movies simply have no image.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from .domain import InteractionRow, ItemRow, UserRow, write_domain
from .errors import RowIssues

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_ARTICLES = ("the", "a", "an", "il", "la", "le", "les", "l'", "el", "das", "der", "die", "un", "une")
_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def _fold(s: str) -> str:
    s = s.lower().replace("&", " and ")
    s = re.sub(r"[^a-z0-9' ]+", " ", s)
    return re.sub(r"\s+", " ", s).strip()


def _front_article(name: str) -> str:
    """'Usual Suspects, The' -> 'The Usual Suspects' (also inside a parenthesised alternative title)."""
    m = re.match(r"^(.*), (\w+'?)$", name.strip())
    if m and m.group(2).lower() in _ARTICLES:
        sep = "" if m.group(2).endswith("'") else " "
        return f"{m.group(2)}{sep}{m.group(1)}"
    return name


def title_keys(title: str) -> tuple[str, int | None, str]:
    """(full normalised name, year, name without parenthesised parts)."""
    title = title.strip()
    m = _YEAR.match(title)
    name, year = (m.group(1), int(m.group(2))) if m else (title, None)
    base = re.sub(r"\s*\([^)]*\)", "", name).strip()
    return _fold(_front_article(name)), year, _fold(_front_article(base))


class PosterIndex:
    """Finds the ML-1M poster of a movie title."""

    def __init__(self, movies_dat: Path, posters_dir: Path):
        self.posters_dir = posters_dir
        self.exact: dict[tuple[str, int | None], str] = {}
        self.base: dict[tuple[str, int | None], str] = {}
        with open(movies_dat, encoding="latin-1") as f:
            for line in f:
                parts = line.rstrip("\n").split("::")
                if len(parts) < 2:
                    continue
                mid, title = parts[0], parts[1]
                full, year, base = title_keys(title)
                self.exact.setdefault((full, year), mid)
                self.base.setdefault((base, year), mid)
                # ML-1M keeps alternative titles in parentheses: index each of them too
                for alt in re.findall(r"\(([^)]*)\)", _YEAR.sub(r"\1", title)):
                    alt = re.sub(r"^(a\.k\.a\.|aka)\s+", "", alt.strip(), flags=re.I)
                    self.base.setdefault((_fold(_front_article(alt)), year), mid)

    def find(self, title: str) -> Path | None:
        full, year, base = title_keys(title)
        mid = self.exact.get((full, year)) or self.base.get((base, year)) or self.base.get((full, year))
        if mid is None and year is not None:
            for y in (year - 1, year + 1):
                mid = self.exact.get((full, y)) or self.base.get((base, y))
                if mid:
                    break
        if mid is None:
            return None
        p = self.posters_dir / f"{mid}.jpg"
        return p if p.exists() else None


def _locate(input_path: Path, posters: Path | None) -> tuple[Path, str, Path | None]:
    """Returns (ratings folder, 'ml-100k' | 'ml-1m', posters folder or None)."""
    candidates = [input_path, input_path / "movielens-100k", input_path / "ml-100k", input_path / "ml-1m"]
    for c in candidates:
        if (c / "u.data").is_file():
            kind, folder = "ml-100k", c
            break
        if (c / "ratings.dat").is_file():
            kind, folder = "ml-1m", c
            break
    else:
        raise FileNotFoundError(
            f"no MovieLens ratings under {input_path}: expected u.data (100K) or ratings.dat (1M) "
            "in it or in its movielens-100k/ subfolder"
        )
    if posters is None:
        for c in (input_path / "movielens-1m-posters", folder.parent / "movielens-1m-posters", folder / "posters"):
            if (c / "movies.dat").is_file():
                posters = c
                break
    return folder, kind, posters


def _split_line(line: str, sep: str, n: int, source: Path, lineno: int, issues: RowIssues) -> list[str] | None:
    parts = line.rstrip("\r\n").split(sep)
    if len(parts) < n:
        issues.bad(source, lineno, "malformed_row", f"expected {n} fields separated by {sep!r}, got {len(parts)}")
        return None
    return parts


def _ratings(path: Path, sep: str, issues: RowIssues) -> Iterator[InteractionRow]:
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = _split_line(line, sep, 4, path, lineno, issues)
            if parts is None:
                continue
            user, item, rating, ts = (p.strip() for p in parts[:4])
            try:
                r = float(rating)
            except ValueError:
                issues.bad(path, lineno, "bad_rating", f"rating {rating!r} is not a number")
                continue
            if not ts.isdigit():
                issues.bad(path, lineno, "bad_timestamp", f"timestamp {ts!r} is not a non-negative integer")
                continue
            yield InteractionRow(user_id=user, item_id=item, timestamp=int(ts), rating=r, source=str(path), line=lineno)


def _items_100k(folder: Path, posters: PosterIndex | None, issues: RowIssues) -> Iterator[ItemRow]:
    path = folder / "u.item"
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = _split_line(line, "|", 5 + len(ML100K_GENRES), path, lineno, issues)
            if parts is None:
                continue
            mid, title, release = parts[0], parts[1], parts[2]
            genres = [g for g, flag in zip(ML100K_GENRES, parts[5:]) if flag.strip() == "1"]
            yield _movie(mid, title, genres, {"release_date": release or None}, posters, str(path), lineno)


def _items_1m(folder: Path, posters: PosterIndex | None, issues: RowIssues) -> Iterator[ItemRow]:
    path = folder / "movies.dat"
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = _split_line(line, "::", 3, path, lineno, issues)
            if parts is None:
                continue
            mid, title, genres = parts[0], parts[1], [g for g in parts[2].split("|") if g]
            image = None
            if posters is not None:  # posters are keyed by ML-1M ids: no title matching needed
                p = posters.posters_dir / f"{mid}.jpg"
                image = p if p.exists() else None
            row = _movie(mid, title, genres, {}, None, str(path), lineno)
            row.image = image
            yield row


def _movie(mid, title, genres, extra, posters, source, lineno) -> ItemRow:
    _, year, _ = title_keys(title)
    attrs = {"genres": genres, "year": year, **extra}
    text = f"{title}. Genres: {', '.join(genres) if genres else 'unknown'}."
    image = posters.find(title) if posters is not None else None
    return ItemRow(item_id=mid.strip(), title=title.strip(), text=text, attributes=attrs, image=image,
                   source=source, line=lineno)


def _users(path: Path, sep: str, fields: tuple[str, ...], issues: RowIssues) -> list[UserRow]:
    rows = []
    if not path.is_file():
        return rows
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = _split_line(line, sep, len(fields) + 1, path, lineno, issues)
            if parts is None:
                continue
            rows.append(UserRow(user_id=parts[0].strip(), attributes=dict(zip(fields, (p.strip() for p in parts[1:])))))
    return rows


def prepare_movielens(input_path: str | Path, out: str | Path, posters: str | Path | None = None,
                      skip_bad_rows: bool = False, overwrite: bool = False, progress: bool = True):
    """Convert MovieLens 100K (u.data/u.item/u.user) or 1M (ratings/movies/users.dat) into a domain."""
    folder, kind, poster_dir = _locate(Path(input_path), Path(posters) if posters else None)
    issues = RowIssues(skip=skip_bad_rows)
    index = PosterIndex(poster_dir / "movies.dat", poster_dir) if poster_dir else None
    if kind == "ml-100k":
        items = list(_items_100k(folder, index, issues))
        interactions = _ratings(folder / "u.data", "\t", issues)
        users = _users(folder / "u.user", "|", ("age", "gender", "occupation", "zip"), issues)
        inputs = [folder / f for f in ("u.data", "u.item", "u.user") if (folder / f).exists()]
    else:
        items = list(_items_1m(folder, index, issues))
        interactions = _ratings(folder / "ratings.dat", "::", issues)
        users = _users(folder / "users.dat", "::", ("gender", "age", "occupation", "zip"), issues)
        inputs = [folder / f for f in ("ratings.dat", "movies.dat", "users.dat") if (folder / f).exists()]
    posters_used = sorted({Path(i.image) for i in items if i.image is not None})
    if poster_dir:
        inputs.append(poster_dir / "movies.dat")
    return write_domain(
        out, name=kind, source=f"MovieLens {kind[3:].upper()} ({folder})" + (f" with posters ({poster_dir})" if poster_dir else ""),
        items=items, interactions=interactions, users=users, issues=issues, inputs=inputs + posters_used,
        overwrite=overwrite, progress=progress,
        extra_meta={"posters": {"folder": str(poster_dir) if poster_dir else None, "matched": len(posters_used)}},
    )
