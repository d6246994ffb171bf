import os
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RECFM_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared(sub: str) -> Path:
    """A folder of ../shared/data, or skip the test saying what is missing."""
    p = SHARED_DATA / sub
    if not p.exists():
        pytest.skip(f"real data not available: {p} is missing (set RECFM_SHARED_DATA to the shared data folder)")
    return p


@pytest.fixture(scope="session")
def small_default(tmp_path_factory):
    """A small built-in default domain, generated once per test session."""
    from recfm.data.synthetic import SyntheticConfig, prepare_default

    out = tmp_path_factory.mktemp("default") / "domain"
    return prepare_default(out, SyntheticConfig(seed=3, n_items=80, n_users=120, max_length=20), progress=False)


@pytest.fixture(scope="session")
def tiny_tokenizers(small_default, tmp_path_factory):
    """Every tokenizer of the small default domain (text BPE, item ids, a briefly trained VQ), once."""
    from recfm.tokenizers.build import tokenize_domain

    out = tmp_path_factory.mktemp("tokenizers") / "tok"
    tokenize_domain(small_default.path, out, vocab_size=500, vq_steps=20, vq_codebook=64, progress=False)
    return out


@contextmanager
def torch_threads(n: int):
    """The machine is shared: torch threads spinning for a core another process holds make small
    models 10-50x slower; one thread is faster there. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    with torch_threads(1):
        yield
