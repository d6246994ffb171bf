"""Domain data: the folder format, converters from public formats, splits, the built-in default domain."""

from .domain import Domain, InteractionRow, ItemRow, UserRow, load_domain, write_domain
from .errors import DataError, RowIssues
from .splits import ItemIndex, Split, cold_item_split, leave_one_out

__all__ = [
    "DataError", "Domain", "InteractionRow", "ItemIndex", "ItemRow", "RowIssues", "Split", "UserRow",
    "cold_item_split", "leave_one_out", "load_domain", "write_domain",
]
