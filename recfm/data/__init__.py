"""Domain data: the folder format, converters from public formats, splits, the built-in default domain."""

from .domain import Domain, InteractionRow, ItemRow, UserRow, load_domain, write_domain
from .errors import DataError, RowIssues
from .splits import SPLITS, ItemIndex, Split, cold_item_split, leave_one_out, make_split

__all__ = [
    "DataError", "Domain", "InteractionRow", "ItemIndex", "ItemRow", "RowIssues", "Split", "UserRow",
    "SPLITS", "cold_item_split", "leave_one_out", "make_split", "load_domain", "write_domain",
]
