"""Native kernels for the engine, compiled from `csrc/` on first use with torch.utils.cpp_extension
(the machine's C++ compiler, OpenMP through the libgomp torch already loaded) and cached under
~/.cache/recfm/extensions (or $RECFM_CACHE/extensions), one build per source, torch version and CPU.

- `paged_decode()`: decode attention read in place from the paged KV cache (csrc/paged_decode.cpp),
  no gathered copy of each sequence's keys and values per layer;
- `gemv_4bit()`: a few rows times a bitsandbytes nf4/fp4 matrix read from its packed bytes
  (csrc/gemv_4bit.cpp), for 4-bit decoding at small batches;
- `gemv_int8()`: a few rows times an int8 matrix with one scale per output row (csrc/gemv_int8.cpp),
  for int8 decoding at small batches;
- `norm_rope()`: RMSNorm (after a residual add) and the rotary embedding in one pass each, bf16
  (csrc/norm_rope.cpp), for the decoder pass's elementwise work.

Each is None when it cannot be built (no compiler, a failed build) or RECFM_NATIVE=0 is set, and
`error(name)` says why; callers then take their plain PyTorch path, with the same answers up to float
rounding.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

_CSRC = Path(__file__).parent / "csrc"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
          "-fassociative-math"]  # reassociation lets the compiler vectorize the dot products
_built: dict[str, object] = {}
_errors: dict[str, str] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("RECFM_CACHE", Path.home() / ".cache" / "recfm")) / "extensions"


def _kernel(stem: str, fn: str):
    if stem in _built or stem in _errors:
        return getattr(_built.get(stem), fn, None)
    if os.environ.get("RECFM_NATIVE", "1") == "0":
        _errors[stem] = "turned off by RECFM_NATIVE=0"
        return None
    source = _CSRC / f"{stem}.cpp"
    try:
        headers = b"".join(h.read_bytes() for h in sorted(_CSRC.glob("*.h")))  # what the sources include
        key = hashlib.sha256(source.read_bytes() + headers + " ".join(
            [torch.__version__, platform.machine(), platform.processor(), torch.backends.cpu.get_cpu_capability(),
             *_FLAGS]).encode()).hexdigest()[:16]
        name = f"recfm_{stem}_{key}"
        build = cache_dir() / f"{stem}-{key}"
        built = build / f"{name}.so"
        if built.is_file() and not (build / "lock").exists():  # built before from this very source and flags (and no
            # other process is building it now, under torch's lock file): load it without the build tool's checks
            _built[stem] = _import(name, built)
        else:
            import logging

            from torch.utils.cpp_extension import load

            build.mkdir(parents=True, exist_ok=True)
            print(f"building recfm's {stem} kernel into {build} (once per machine and torch version; about a minute)",
                  file=sys.stderr, flush=True)
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            _built[stem] = load(name=name, sources=[str(source)], build_directory=str(build), extra_cflags=_FLAGS,
                                extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers, a failed build: the caller's PyTorch path stands in
        _errors[stem] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return None
    return getattr(_built[stem], fn)


def _import(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paged_decode():
    """(q, k_cache, v_cache, block_table, lengths, scale) -> out, or None."""
    return _kernel("paged_decode", "paged_decode")


def gemv_4bit():
    """(x (m, k), packed uint8, absmax fp32, code (16,), n, block) -> (m, n), or None."""
    return _kernel("gemv_4bit", "gemv_4bit")


def gemv_int8():
    """(x (m, k) fp32, q (n, k) int8, scale (n,) fp32) -> (m, n), or None."""
    return _kernel("gemv_int8", "gemv_int8")


def norm_rope():
    """The norm_rope module (rms_norm, add_rms_norm_, rope_), or None."""
    return _built.get("norm_rope") if _kernel("norm_rope", "rope_") is not None else None


def error(stem: str = "paged_decode") -> str | None:
    """Why a kernel is None (after it was asked for)."""
    return _errors.get(stem)
