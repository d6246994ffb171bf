"""The `recfm` command, run as a real process through its console script."""

import json
import shutil
import subprocess
import sys

from conftest import shared
from test_converters import write_ml100k


def recfm(*args, check=True):
    exe = shutil.which("recfm") or f"{sys.executable} -m recfm.cli"
    proc = subprocess.run([*exe.split(), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_help_lists_every_subcommand():
    out = recfm("--help").stdout
    for cmd in ("quickstart", "data"):
        assert cmd in out
    data = recfm("data", "--help").stdout
    assert "prepare" in data and "stats" in data


def test_prepare_default_and_stats_json(tmp_path):
    recfm("data", "prepare", "default", "-o", tmp_path / "d", "--items-count", 60, "--users-count", 50, "--seed", 7)
    stats = json.loads(recfm("data", "stats", tmp_path / "d", "--json").stdout)
    assert stats["items"] == 60 and stats["users"] == 50 and stats["items_with_image"] == 60
    assert stats["oracle"]["test"]["oracle"]["hr@10"] > stats["oracle"]["test"]["text_only_oracle"]["hr@10"]
    table = recfm("data", "stats", tmp_path / "d").stdout
    assert "text only oracle" in table and "leave-one-out" in table


def test_bad_input_exits_2_with_file_and_line(tmp_path):
    root = write_ml100k(tmp_path / "in", extra_data="oops\n")
    proc = recfm("data", "prepare", "movielens", "--input", root, "-o", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "u.data:7: expected 4 fields" in proc.stderr
    proc = recfm("data", "prepare", "movielens", "--input", root, "-o", tmp_path / "o", "--skip-bad-rows")
    assert "skipped 1 bad rows" in proc.stdout and "malformed_row" in proc.stdout
    assert recfm("data", "stats", tmp_path / "nothing", check=False).returncode == 2


def test_movielens_real_through_cli(tmp_path):
    root = shared("movielens-100k").parent
    recfm("data", "prepare", "movielens", "--input", root, "-o", tmp_path / "ml")
    s = json.loads(recfm("data", "stats", tmp_path / "ml", "--json").stdout)
    assert (s["users"], s["items"], s["interactions"]) == (943, 1682, 100_000) and s["items_with_image"] >= 1600
    assert s["splits"]["leave_one_out"]["test"] == 943
