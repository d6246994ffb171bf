"""`recfm data stats`: what a domain holds, its split sizes, and (default domain) its oracle numbers."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from .domain import Domain
from .splits import cold_item_split, leave_one_out

PERCENTILES = (5, 25, 50, 75, 95, 100)


def domain_stats(domain: Domain, cold_fraction: float = 0.05, seed: int = 0) -> dict:
    lengths = np.asarray(pc.list_value_length(domain.sequences.data.column("item_ids")).to_numpy())
    loo = leave_one_out(domain)
    cold = cold_item_split(domain, cold_fraction, seed)
    c = domain.meta["counts"]
    out = {
        "name": domain.name,
        "source": domain.meta["source"],
        "users": c["users"],
        "items": c["items"],
        "interactions": c["interactions"],
        "items_with_image": c["items_with_image"],
        "interactions_with_review": c["interactions_with_review"],
        "sequence_length": {f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES} | {"mean": float(lengths.mean())},
        "splits": {
            "leave_one_out": loo.sizes(),
            "cold_item": {"cold_items": len(cold.cold_items), "fraction": cold_fraction, "seed": seed,
                          "train_interactions": cold.sizes()["train_interactions"], "test": len(cold.test)},
        },
        "skipped": domain.meta.get("skipped", {}).get("total", 0),
    }
    if "oracle" in domain.meta:
        out["oracle"] = domain.meta["oracle"]
    return out
