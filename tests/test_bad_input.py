"""Every kind of bad input: a clear error naming file and line, or (skip) a count; nothing silent."""

import json

import pytest

from recfm.data import DataError
from recfm.data.generic import prepare_generic
from recfm.data.movielens import prepare_movielens
from test_converters import _jpg, write_ml100k


def _generic(tmp_path, interactions: str, items: str | None = None, suffix=".csv", skip=False, images=None):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / f"interactions{suffix}").write_text(interactions)
    if items is not None:
        (src / "items.csv").write_text(items)
    return prepare_generic(tmp_path / "out", input_dir=src, skip_bad_rows=skip, overwrite=True, progress=False,
                           images=images)


ITEMS = "item_id,title,image\na,A,\nb,B,\nc,C,\n"

CASES = [
    # (name, interactions csv, items csv, reason, message fragment, line)
    ("malformed", "user_id,item_id,timestamp\nu1,a,1\nu1,b\nu2,c,3\n", ITEMS, "malformed_row", "expected 3 columns", 3),
    ("bad timestamp", "user_id,item_id,timestamp\nu1,a,1\nu1,b,yesterday\nu2,c,3\n", ITEMS, "bad_timestamp", "'yesterday'", 3),
    ("negative timestamp", "user_id,item_id,timestamp\nu1,a,-5\nu1,b,2\nu2,c,3\n", ITEMS, "bad_timestamp", "'-5'", 2),
    ("bad rating", "user_id,item_id,timestamp,rating\nu1,a,1,good\nu1,b,2,4\nu2,c,3,5\n", ITEMS, "bad_rating", "'good'", 2),
    ("unknown item", "user_id,item_id,timestamp\nu1,a,1\nu1,zz,2\nu2,c,3\n", ITEMS, "unknown_item", "'zz'", 3),
    ("duplicate interaction", "user_id,item_id,timestamp\nu1,a,1\nu2,c,3\nu1,a,1\n", ITEMS, "duplicate_interaction", "twice", 4),
    ("duplicate item", "user_id,item_id,timestamp\nu1,a,1\nu2,c,3\n", ITEMS + "a,Again,\n", "duplicate_item", "'a' appears twice", 5),
]


@pytest.mark.parametrize("name,inter,items,reason,fragment,line", CASES, ids=[c[0] for c in CASES])
def test_strict_error_names_file_and_line(tmp_path, name, inter, items, reason, fragment, line):
    with pytest.raises(DataError) as e:
        _generic(tmp_path, inter, items)
    assert e.value.line == line
    assert e.value.source.endswith(".csv")
    assert fragment in str(e.value) and f":{line}:" in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("name,inter,items,reason,fragment,line", CASES, ids=[c[0] for c in CASES])
def test_skip_counts_and_records_every_bad_row(tmp_path, name, inter, items, reason, fragment, line):
    d = _generic(tmp_path, inter, items, skip=True)
    skipped = d.meta["skipped"]
    assert skipped["by_reason"] == {reason: 1} and skipped["total"] == 1
    assert f":{line}:" in skipped["examples"][reason][0]
    written = json.loads((d.path / "domain.json").read_text())["skipped"]
    assert written == skipped
    # nothing dropped silently: good rows + skipped rows = rows in the file
    n_rows = len(inter.strip().splitlines()) - 1
    if reason != "duplicate_item":
        assert d.meta["counts"]["interactions"] + skipped["total"] == n_rows


def test_non_monotonic_timestamps_in_a_sequence(tmp_path):
    lines = [json.dumps({"user_id": "u1", "items": ["a", "b"], "timestamps": [1, 2]}),
             json.dumps({"user_id": "u2", "items": ["a", "b", "c"], "timestamps": [5, 9, 7]})]
    with pytest.raises(DataError, match=r"interactions.jsonl:2: .*position 2 is earlier"):
        _generic(tmp_path, "\n".join(lines), suffix=".jsonl")
    d = _generic(tmp_path, "\n".join(lines), suffix=".jsonl", skip=True)
    assert d.meta["skipped"]["by_reason"] == {"non_monotonic_timestamp": 1}


def test_invalid_json_line(tmp_path):
    with pytest.raises(DataError, match=r"interactions.jsonl:2: not valid JSON"):
        _generic(tmp_path, '{"user_id": "u", "item_id": "a", "timestamp": 1}\n{"user_id": \n', suffix=".jsonl")


def test_missing_and_unreadable_images(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _jpg(imgs / "ok.jpg")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    items = "item_id,title,image\na,A,ok.jpg\nb,B,gone.jpg\nc,C,broken.jpg\n"
    inter = "user_id,item_id,timestamp\nu1,a,1\nu1,b,2\nu2,c,3\n"
    with pytest.raises(DataError, match=r"items.csv:3: image .*gone.jpg does not exist"):
        _generic(tmp_path, inter, items, images=imgs)
    (tmp_path / "src" / "items.csv").write_text("item_id,title,image\na,A,ok.jpg\nc,C,broken.jpg\nb,B,\n")
    with pytest.raises(DataError, match=r"items.csv:3: image .*broken.jpg cannot be read"):
        _generic(tmp_path, inter, "item_id,title,image\na,A,ok.jpg\nc,C,broken.jpg\nb,B,\n", images=imgs)
    d = _generic(tmp_path, inter, items, images=imgs, skip=True)
    # the items are kept, without their image, and counted
    assert d.meta["skipped"]["by_reason"] == {"missing_image": 1, "unreadable_image": 1}
    assert d.meta["counts"]["items"] == 3 and d.meta["counts"]["items_with_image"] == 1
    assert d.meta["counts"]["interactions"] == 3


def test_bad_movielens_row(tmp_path):
    root = write_ml100k(tmp_path / "in", extra_data="1\t4\tfive\t120\n")
    with pytest.raises(DataError, match=r"u.data:7: rating 'five' is not a number"):
        prepare_movielens(root, tmp_path / "out", progress=False)
    d = prepare_movielens(root, tmp_path / "out", skip_bad_rows=True, progress=False)
    assert d.meta["skipped"]["by_reason"] == {"bad_rating": 1}


def test_all_rows_bad_is_an_error_not_an_empty_domain(tmp_path):
    with pytest.raises(ValueError, match="no interactions left"):
        _generic(tmp_path, "user_id,item_id,timestamp\nu1,zz,1\n", ITEMS, skip=True)
