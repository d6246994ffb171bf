"""Native kernels for the engine, compiled from `csrc/` on first use with torch.utils.cpp_extension
(the machine's C++ compiler, OpenMP through the libgomp torch already loaded) and cached under
~/.cache/recfm/extensions (or $RECFM_CACHE/extensions), one build per source, torch version and CPU.

`paged_decode()` is decode attention read in place from the paged KV cache (see
csrc/paged_decode.cpp): no gathered copy of each sequence's keys and values per layer. When it cannot
be built (no compiler, a failed build) or RECFM_NATIVE=0 is set, it is None, `error()` says why, and
the engine gathers blocks and calls SDPA instead; the answers are the same either way up to float
rounding.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
          "-fassociative-math"]  # reassociation lets the compiler vectorize the dot products
_op = None
_error: str | None = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("RECFM_CACHE", Path.home() / ".cache" / "recfm")) / "extensions"


def paged_decode():
    """The compiled op (q, k_cache, v_cache, block_table, lengths, scale) -> out, or None."""
    global _op, _error, _tried
    if _tried:
        return _op
    _tried = True
    if os.environ.get("RECFM_NATIVE", "1") == "0":
        _error = "turned off by RECFM_NATIVE=0"
        return None
    try:
        import logging

        from torch.utils.cpp_extension import load

        key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(
            [torch.__version__, platform.machine(), platform.processor(), torch.backends.cpu.get_cpu_capability(),
             *_FLAGS]).encode()).hexdigest()[:16]
        name = f"recfm_paged_decode_{key}"
        build = cache_dir() / f"paged_decode-{key}"
        built = build / f"{name}.so"
        if built.is_file():  # built before from this very source and flags: load it without the build tool's checks
            _op = _import(name, built).paged_decode
            return _op
        build.mkdir(parents=True, exist_ok=True)
        print(f"building the native decode-attention kernel into {build} (once per machine and torch version; "
              "about a minute)", file=sys.stderr, flush=True)
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        module = load(name=name, sources=[str(_SOURCE)], build_directory=str(build),
                      extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
        _op = module.paged_decode
    except Exception as e:  # no compiler, no headers, a failed build: the engine's SDPA path stands in
        _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return _op


def _import(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error() -> str | None:
    """Why `paged_decode()` is None (after it was asked for)."""
    return _error
