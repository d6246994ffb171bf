"""Converters: MovieLens (100K and 1M), Amazon reviews, generic CSV/JSONL, on fixtures and real data."""

import gzip
import json

import pytest
from PIL import Image

from conftest import shared
from recfm.data import load_domain
from recfm.data.amazon import prepare_amazon
from recfm.data.generic import Columns, prepare_generic
from recfm.data.movielens import PosterIndex, prepare_movielens, title_keys


def _jpg(path, colour=(200, 10, 10)):
    Image.new("RGB", (18, 27), colour).save(path, format="JPEG")


def write_ml100k(root, extra_data=""):
    ml = root / "movielens-100k"
    ml.mkdir(parents=True)
    g = lambda *k: "|".join("1" if i in k else "0" for i in range(19))
    (ml / "u.item").write_text(
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{g(3, 4, 5)}\n"
        f"2|Usual Suspects, The (1995)|14-Aug-1995||http://x|{g(6, 16)}\n"
        f"3|Seven (Se7en) (1995)|01-Jan-1995||http://x|{g(6, 16)}\n"
        f"4|Star Wars (1977)|01-Jan-1977||http://x|{g(1, 2)}\n", encoding="latin-1")
    (ml / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    (ml / "u.data").write_text("1\t1\t5\t100\n1\t2\t4\t90\n1\t3\t3\t110\n2\t4\t5\t50\n2\t1\t2\t60\n2\t3\t1\t70\n" + extra_data)
    posters = root / "movielens-1m-posters"
    posters.mkdir()
    (posters / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation\n50::Usual Suspects, The (1995)::Crime\n47::Seven (Se7en) (1995)::Thriller\n",
        encoding="latin-1")
    for mid in (1, 50, 47):
        _jpg(posters / f"{mid}.jpg")
    return root


def test_title_normalisation_and_poster_join(tmp_path):
    assert title_keys("Usual Suspects, The (1995)")[:2] == title_keys("The Usual Suspects (1995)")[:2]
    root = write_ml100k(tmp_path)
    idx = PosterIndex(root / "movielens-1m-posters" / "movies.dat", root / "movielens-1m-posters")
    assert idx.find("Seven (1995)").name == "47.jpg"  # alternative title in parentheses
    assert idx.find("Toy Story (1996)").name == "1.jpg"  # year off by one
    assert idx.find("Star Wars (1977)") is None


def test_movielens_100k_fixture(tmp_path):
    d = prepare_movielens(write_ml100k(tmp_path / "in"), tmp_path / "out", progress=False)
    c = d.meta["counts"]
    assert (c["users"], c["items"], c["interactions"], c["items_with_image"]) == (2, 4, 6, 3)
    assert d.sequences[0]["item_ids"] == ["2", "1", "3"]  # user 1 by time
    assert d.item("1")["attributes"]["genres"] == ["Animation", "Children's", "Comedy"]
    assert d.item("4")["title"] == "Star Wars (1977)" and d.image_path("4") is None
    assert d.image("2").size == (18, 27)
    assert json.loads(d.users[0]["attributes"]) == {"age": "24", "gender": "M", "occupation": "technician", "zip": "85711"}
    assert d.meta["inputs_sha256"] and len(d.items_with_images()) == 3


def test_movielens_1m_format(tmp_path):
    ml = tmp_path / "ml-1m"
    ml.mkdir()
    (ml / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978300761\n2::10::4::978300000\n")
    (ml / "movies.dat").write_text("10::GoldenEye (1995)::Action|Adventure\n20::Heat (1995)::Crime\n", encoding="latin-1")
    (ml / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    posters = tmp_path / "posters"
    posters.mkdir()
    (posters / "movies.dat").write_text("10::GoldenEye (1995)::Action\n")
    _jpg(posters / "10.jpg")
    d = prepare_movielens(ml, tmp_path / "out", posters=posters, progress=False)
    assert d.name == "ml-1m" and d.meta["counts"]["items_with_image"] == 1
    assert d.item("10")["attributes"]["genres"] == ["Action", "Adventure"]


def test_movielens_100k_real(tmp_path):
    root = shared("movielens-100k").parent
    shared("movielens-1m-posters")
    d = prepare_movielens(root, tmp_path / "ml", progress=False)
    c = d.meta["counts"]
    assert (c["users"], c["items"], c["interactions"]) == (943, 1682, 100_000)
    assert c["items_with_image"] >= 1600
    rated = d.interactions["item_id"]
    with_image = {r["item_id"] for r in d.items if r["image_path"]}
    assert sum(i in with_image for i in rated) / len(rated) > 0.97


def _amazon_lines():
    rows = []
    for u, item, t, r in [("A", "i1", 1, 5), ("A", "i2", 2, 4), ("A", "i3", 3, 2), ("B", "i1", 5, 3),
                          ("B", "i3", 6, 4), ("B", "i2", 7, 5)]:
        rows.append({"reviewerID": u, "asin": item, "overall": float(r), "unixReviewTime": t,
                     "reviewText": f"review {u}{item}", "summary": f"summary {u}{item}", "helpful": [0, 0]})
    return rows


def test_amazon_fixture_and_item_text_has_no_held_out_review(tmp_path):
    path = tmp_path / "reviews_Toys_5.json.gz"
    with gzip.open(path, "wt") as f:
        for r in _amazon_lines():
            f.write(json.dumps(r) + "\n")
    d = prepare_amazon(path, tmp_path / "out", progress=False)
    assert d.name == "amazon-toys"
    assert (d.meta["counts"]["users"], d.meta["counts"]["items"], d.meta["counts"]["interactions"]) == (2, 3, 6)
    # A's held-out reviews are of i2, i3; B's of i3, i2: only the training reviews (A-i1, B-i1) are quoted
    texts = " ".join(r["text"] or "" for r in d.items)
    assert "summary Ai1" in texts and "summary Bi1" in texts
    for held in ("Ai2", "Ai3", "Bi3", "Bi2"):
        assert held not in texts
    assert d.sequences[0]["reviews"] == ["review Ai1", "review Ai2", "review Ai3"]


def test_amazon_metadata_and_images(tmp_path):
    path = tmp_path / "reviews.json"
    path.write_text("\n".join(json.dumps(r) for r in _amazon_lines()))
    meta = tmp_path / "meta.json"
    meta.write_text("{'asin': 'i1', 'title': 'Guitar strings', 'description': 'Bright tone.'}\n")  # Python-literal lines
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _jpg(imgs / "i2.jpg")
    d = prepare_amazon(path, tmp_path / "out", metadata=meta, images=imgs, progress=False)
    assert d.item("i1")["title"] == "Guitar strings" and d.item("i1")["text"] == "Guitar strings Bright tone."
    assert d.image_path("i2") is not None and d.image_path("i1") is None


def test_amazon_real(tmp_path):
    folder = shared("amazon-musical-instruments-5core")
    d = prepare_amazon(folder, tmp_path / "amz", progress=False)
    c = d.meta["counts"]
    assert (c["users"], c["items"], c["interactions"]) == (1429, 900, 10_261)
    assert c["interactions_with_review"] >= 10_250  # a handful of reviews have empty text in the source


def test_generic_csv_with_column_mapping_and_images(tmp_path):
    src = tmp_path / "src"
    (src / "pics").mkdir(parents=True)
    _jpg(src / "pics" / "p1.jpg")
    (src / "events.csv").write_text("uid,sku,when,stars\nu1,s1,2024-01-02T10:00:00Z,5\nu1,s2,1704100000,3\nu2,s1,2024-01-03,4\n")
    (src / "catalogue.csv").write_text("sku,name,blurb,pic,colour\ns1,Shoe,A red shoe,p1.jpg,red\ns2,Hat,A hat,,blue\n")
    cols = Columns(user="uid", item="sku", timestamp="when", rating="stars", item_id="sku", title="name", text="blurb", image="pic")
    d = prepare_generic(tmp_path / "out", interactions=src / "events.csv", items=src / "catalogue.csv",
                        images=src / "pics", columns=cols, name="shop", progress=False)
    assert d.name == "shop" and d.meta["counts"]["items_with_image"] == 1
    assert d.sequences[0]["item_ids"] == ["s2", "s1"]  # 1704100000 is 2024-01-01
    assert d.item("s1")["attributes"] == {"colour": "red"} and d.item("s1")["title"] == "Shoe"
    assert d.sequences[0]["ratings"] == [3.0, 5.0]


def test_generic_jsonl_sequences_from_input_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "interactions.jsonl").write_text(
        json.dumps({"user_id": "u1", "items": ["a", "b", "c"]}) + "\n"
        + json.dumps({"user_id": "u2", "items": ["c", "a"], "timestamps": [10, 20]}) + "\n")
    d = prepare_generic(tmp_path / "out", input_dir=src, progress=False)
    assert d.meta["counts"]["items"] == 3 and d.meta["counts"]["interactions"] == 5
    assert [r["item_ids"] for r in d.sequences] == [["a", "b", "c"], ["c", "a"]]
    assert load_domain(tmp_path / "out").meta == d.meta


def test_refuses_to_overwrite(tmp_path):
    root = write_ml100k(tmp_path / "in")
    prepare_movielens(root, tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_movielens(root, tmp_path / "out", progress=False)
    prepare_movielens(root, tmp_path / "out", overwrite=True, progress=False)
