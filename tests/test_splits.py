"""Leave-one-out and cold-item splits, and the item index: nothing from evaluation leaks into training."""

from recfm.data import InteractionRow, ItemIndex, ItemRow, cold_item_split, leave_one_out, write_domain


def _domain(tmp_path, sequences: dict[str, list[str]], name="d"):
    items = sorted({i for s in sequences.values() for i in s} | {"unused"})
    rows = [InteractionRow(user_id=u, item_id=i, timestamp=100 + t, rating=4.0)
            for u, seq in sequences.items() for t, i in enumerate(seq)]
    return write_domain(tmp_path / name, name=name, source="test", items=[ItemRow(item_id=i) for i in items],
                        interactions=rows, progress=False)


def test_leave_one_out_holds_out_last_two_by_time(tmp_path):
    d = _domain(tmp_path, {"u1": ["a", "b", "c", "d"], "u2": ["b", "c"], "u3": ["c", "a", "e"]})
    s = leave_one_out(d)
    train = {r["user_id"]: r["item_ids"] for r in s.train}
    assert train == {"u1": ["a", "b"], "u2": ["b", "c"], "u3": ["c"]}
    test = {r["user_id"]: (r["history"], r["target"]) for r in s.test}
    valid = {r["user_id"]: (r["history"], r["target"]) for r in s.valid}
    assert test == {"u1": (["a", "b", "c"], "d"), "u3": (["c", "a"], "e")}
    assert valid == {"u1": (["a", "b"], "c"), "u3": (["c"], "a")}


def test_time_order_not_file_order_and_ties_by_item(tmp_path):
    rows = [InteractionRow("u", "z", 30), InteractionRow("u", "b", 10), InteractionRow("u", "a", 20),
            InteractionRow("u", "c", 20)]
    d = write_domain(tmp_path / "d", name="d", source="t", items=[ItemRow(i) for i in "abcz"], interactions=rows,
                     progress=False)
    assert d.sequences[0]["item_ids"] == ["b", "a", "c", "z"]


def test_item_index_depends_on_training_only(tmp_path):
    # two worlds with the same training data but different held-out items and a different order of
    # consumption by test users: the index must be identical
    base = {"u1": ["a", "b", "c", "d", "e"], "u2": ["b", "a", "d"], "u3": ["c", "b", "x", "y"]}
    other = {"u1": ["a", "b", "c", "y", "x"], "u2": ["b", "a", "x"], "u3": ["c", "b", "e", "d"]}
    d1, d2 = _domain(tmp_path, base, "d1"), _domain(tmp_path, other, "d2")
    s1, s2 = leave_one_out(d1), leave_one_out(d2)
    assert s1.train["item_ids"] == s2.train["item_ids"]
    i1 = ItemIndex.from_training(s1.train, d1.item_ids)
    i2 = ItemIndex.from_training(s2.train, d2.item_ids)
    assert i1.item_ids == i2.item_ids
    # training items first (by training popularity), then unseen ones by id
    assert i1.item_ids[: i1.n_train_items] == ["b", "c", "a"]  # b 3x, c 2x, a 1x
    assert i1.item_ids[i1.n_train_items:] == ["d", "e", "unused", "x", "y"]


def test_item_index_save_load(tmp_path, small_default):
    s = leave_one_out(small_default)
    idx = ItemIndex.from_training(s.train, small_default.item_ids)
    idx.save(tmp_path / "index.json")
    again = ItemIndex.load(tmp_path / "index.json")
    assert again.item_ids == idx.item_ids and again.n_train_items == idx.n_train_items
    assert all(idx[i] == k for k, i in enumerate(idx.item_ids))


def test_no_test_target_in_any_training_sequence_of_its_user(small_default):
    s = leave_one_out(small_default)
    train = {r["user_id"]: r["item_ids"] for r in s.train}
    for r in s.test:
        assert r["target"] not in train[r["user_id"]]
        assert r["target_timestamp"] > max(r["history_timestamps"])
    for r in s.valid:
        assert r["target"] not in train[r["user_id"]]


def test_cold_items_never_in_training(small_default):
    c = cold_item_split(small_default, fraction=0.1, seed=1)
    cold = set(c.cold_items)
    n_with_interactions = small_default.meta["counts"]["items_with_interactions"]
    assert len(cold) == round(0.1 * n_with_interactions)
    for seq in c.train["item_ids"]:
        assert not cold & set(seq)
    assert len(c.test) > 0
    for r in c.test:
        assert r["target"] in cold and not cold & set(r["history"]) and r["history"]
    idx = ItemIndex.from_training(c.train, small_default.item_ids)
    assert all(idx[i] >= idx.n_train_items for i in cold)
    assert cold_item_split(small_default, fraction=0.1, seed=1).cold_items == c.cold_items
    assert cold_item_split(small_default, fraction=0.1, seed=2).cold_items != c.cold_items
