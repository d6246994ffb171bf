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


def test_quickstart_end_to_end_leaves_a_loadable_run_and_the_next_commands(tmp_path, monkeypatch):
    """The quickstart's own code path at toy sizes (in-process, so the tokenizer budget can shrink): a
    prepared domain in the work folder is used as it is; every stage runs; the run folder loads with
    from_pretrained; the report covers all five task families; the last lines say how to chat and serve."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    import recfm.cli as cli
    import recfm.foundation  # noqa: F401  (registers the model with the Auto classes)
    from recfm.data.synthetic import SyntheticConfig, prepare_default

    prepare_default(tmp_path / "domain", SyntheticConfig(seed=3, n_items=60, n_users=40, max_length=12), progress=False)
    monkeypatch.setitem(cli.QUICKSTART_TOKENIZERS, "vq_steps", 5)
    res = CliRunner().invoke(cli.app, ["quickstart", "--workdir", str(tmp_path), "--seed", "3", "--pretrain-steps", "3",
                                       "--tune-steps", "2", "--eval-users", "4"])
    assert res.exit_code == 0, res.output
    assert "using " + str(tmp_path / "domain") in res.output.replace("\n", "")
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["steps"] == 2
    assert json.loads((tmp_path / "pretrain" / "run.json").read_text())["steps"] == 3
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert {"next_item", "explanation", "yes_no", "review", "image_generation"} <= set(report["tasks"])
    assert report["users"] == 4 and "popularity" in report["baselines"] and "oracle" in report["baselines"]
    assert f"recfm chat {run}" in res.output.replace("\n", "") and f"recfm serve {run}" in res.output.replace("\n", "")
    model = AutoModelForCausalLM.from_pretrained(run)
    assert model.config.item_mode == "atomic" and model.config.n_items == 60
