"""Helpers the benchmark scripts share: the machine they ran on, and writing a result table."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
AMAZON_INPUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-musical-instruments-5core"


def amazon_domain(source: Path) -> Path:
    """The Amazon reviews domain prepared from `source` (a 5-core file or its folder) under the user's
    cache, once; exits with a clear message when the data is missing."""
    import sys

    if not source.exists():
        sys.exit(f"{source} is missing: this benchmark needs the Amazon reviews data (see ../shared/data/README.md)")
    from recfm.data.amazon import prepare_amazon

    data_dir = Path.home() / ".cache" / "recfm" / "data" / "amazon"
    if not (data_dir / "domain.json").exists():
        prepare_amazon(source, data_dir, overwrite=True, progress=False)
    return data_dir


def machine(threads: int | None = None) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": threads if threads is not None else torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()}


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def write(name: str, markdown: str, data: dict, out: Path = RESULTS) -> Path:
    """out/name.md and out/name.json; returns the .md path (a plot goes next to it, .with_suffix(".png"))."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=float) + "\n")
    return out / f"{name}.md"
