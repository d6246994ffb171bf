"""Bad input: one error type that names the file and line, and a ledger for skipped rows.

Converters call `issues.bad(source, line, reason, message)` for every row they cannot use. In strict
mode (the default) that raises `DataError` at once; with `--skip-bad-rows` the row is skipped and
counted by reason, and the counts end up printed and in `domain.json`. Nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REASONS = {
    "malformed_row": "a row that cannot be parsed or lacks a required field",
    "bad_timestamp": "a timestamp that is not a non-negative number or an ISO 8601 date",
    "non_monotonic_timestamp": "a timestamp earlier than the one before it in a user's ordered sequence",
    "bad_rating": "a rating that is not a number",
    "duplicate_item": "an item id that appears twice in the items file",
    "duplicate_interaction": "the same (user, item, timestamp) twice",
    "unknown_item": "an interaction with an item that is not in the catalogue",
    "missing_image": "an image path that does not exist (the item is kept, without an image)",
    "unreadable_image": "an image file that cannot be decoded (the item is kept, without an image)",
}


class DataError(ValueError):
    """A problem with one row of an input file."""

    def __init__(self, source: str | Path, line: int | None, message: str):
        self.source, self.line, self.message = str(source), line, message
        where = f"{source}:{line}" if line is not None else str(source)
        super().__init__(f"{where}: {message}")


@dataclass
class RowIssues:
    """Raises on the first bad row, or (skip=True) counts bad rows by reason and keeps a few examples."""

    skip: bool = False
    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def bad(self, source: str | Path, line: int | None, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        err = DataError(source, line, message)
        if not self.skip:
            raise err
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> dict:
        return {
            "total": self.total,
            "by_reason": dict(sorted(self.counts.items())),
            "examples": {k: v for k, v in sorted(self.examples.items())},
        }

    def summary(self) -> str:
        if not self.total:
            return "no bad rows"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total} bad rows: {parts}"
