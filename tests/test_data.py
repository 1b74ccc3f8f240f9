"""Tests of sample identity (lightning_memo.data): IndexedDataset, accessors, index/label checks.
Oracles are the items and positions built by hand in each test and Python loops. (The demo data,
``load_digits_flipped``, is tested in tests/test_demo_common.py.)"""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_memo.data import IndexedDataset, get_indices, get_labels, make_accessor
from lightning_memo.exceptions import MissingIndexError, MissingLabelError, SampleIndexError

# ---------------------------------------------------------------------------------- fixtures


class _DictDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "label": i % 2}


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


class _NoLen:
    def __getitem__(self, i: int) -> int:
        return i


# ---------------------------------------------------------------------------------- IndexedDataset


def test_indexed_dataset_tuple_items_gain_index_last():
    x = torch.randn(7, 4)
    y = torch.arange(7) % 3
    ds = IndexedDataset(TensorDataset(x, y))
    assert len(ds) == 7
    for i in range(7):
        item = ds[i]
        assert isinstance(item, tuple) and len(item) == 3
        assert torch.equal(item[0], x[i])
        assert int(item[1]) == int(y[i])
        assert item[2] == i


def test_indexed_dataset_list_items_become_tuples():
    ds = IndexedDataset([["a", 1], ["b", 2]])
    assert ds[0] == ("a", 1, 0)
    assert ds[1] == ("b", 2, 1)


def test_indexed_dataset_dict_items_gain_index_key():
    base = _DictDataset(5)
    ds = IndexedDataset(base)
    assert len(ds) == 5
    for i in range(5):
        item = ds[i]
        assert set(item) == {"x", "label", "index"}
        assert item["index"] == i
        assert torch.equal(item["x"], base.x[i])
        assert item["label"] == i % 2
    # the wrapped dataset's items are not mutated
    assert "index" not in base[0]
    # a custom key
    assert IndexedDataset(base, index_key="idx")[3]["idx"] == 3


def test_indexed_dataset_bare_tensor_items():
    x = torch.randn(6, 2)
    ds = IndexedDataset(x)  # a tensor is map-style: x[i] is a bare tensor
    assert len(ds) == 6
    for i in range(6):
        xi, idx = ds[i]
        assert torch.equal(xi, x[i])
        assert idx == i


def test_indexed_dataset_default_collate_gives_position_tensor():
    n = 11
    x = torch.randn(n, 3)
    y = torch.arange(n) % 4
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4, shuffle=False)
    seen = []
    for xb, yb, ib in loader:
        assert ib.dtype == torch.int64 and ib.ndim == 1
        assert torch.equal(xb, x[ib])
        assert torch.equal(yb, y[ib])
        seen.append(ib)
    assert torch.equal(torch.cat(seen), torch.arange(n))

    # shuffled: the index still names each sample's position
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(
        IndexedDataset(TensorDataset(x, y)), batch_size=5, shuffle=True, generator=g
    )
    allidx = []
    for xb, _, ib in loader:
        assert torch.equal(xb, x[ib])
        allidx.append(ib)
    assert sorted(torch.cat(allidx).tolist()) == list(range(n))


def test_indexed_dataset_dict_collate():
    loader = DataLoader(IndexedDataset(_DictDataset(5)), batch_size=5)
    batch = next(iter(loader))
    assert torch.equal(batch["index"], torch.arange(5))
    assert torch.equal(batch["label"], torch.tensor([0, 1, 0, 1, 0]))


@pytest.mark.parametrize("bad", [_Stream(), _NoLen(), iter(range(3))])
def test_indexed_dataset_refuses_non_map_style(bad):
    with pytest.raises(TypeError, match="map-style") as info:
        IndexedDataset(bad)
    assert type(bad).__name__ in str(info.value)


# ---------------------------------------------------------------------------------- make_accessor


def test_accessor_default_index():
    acc = make_accessor(None, "index")
    idx = torch.tensor([4, 2])
    assert acc({"x": 1, "index": idx}) is idx
    assert acc(("x", "y", idx)) is idx
    assert acc(["x", "y", "z", idx]) is idx
    with pytest.raises(KeyError):
        acc({"x": 1, "label": 2})
    with pytest.raises(KeyError):
        acc(torch.zeros(2, 3))
    # an (inputs, labels) batch has no index: the index is last of at least 3 elements
    with pytest.raises(KeyError, match="at least 3 elements"):
        acc(("x", idx))
    with pytest.raises(KeyError, match="at least 3 elements"):
        acc((torch.zeros(2, 3),))


def test_accessors_are_picklable():
    for kind in ("index", "label", "input"):
        acc = pickle.loads(pickle.dumps(make_accessor(None, kind)))
        assert acc(("a", "b", "c")) == {"index": "c", "label": "b", "input": "a"}[kind]
    acc = pickle.loads(pickle.dumps(make_accessor("ids", "index")))
    assert acc({"ids": 5}) == 5
    acc = pickle.loads(pickle.dumps(make_accessor(1, "label")))
    assert acc(("a", "b")) == "b"


@pytest.mark.parametrize("key", ["label", "labels", "y"])
def test_accessor_default_label_keys(key):
    acc = make_accessor(None, "label")
    lab = torch.tensor([1, 0])
    assert acc({"x": torch.zeros(2), key: lab, "index": torch.arange(2)}) is lab


def test_accessor_default_label_position_and_priority():
    acc = make_accessor(None, "label")
    a, b = torch.tensor([1]), torch.tensor([2])
    assert acc(("x", a, "i")) is a
    # "label" is preferred to "labels" / "y"
    assert acc({"y": b, "label": a}) is a
    assert acc(("x", a)) is a  # (inputs, labels)
    with pytest.raises(KeyError):
        acc({"x": 1})
    with pytest.raises(KeyError, match="at least 2 elements"):
        acc(("x",))
    with pytest.raises(KeyError):
        acc(torch.zeros(3))


def test_accessor_default_input():
    acc = make_accessor(None, "input")
    x = torch.randn(2, 3)
    assert acc((x, "y", "i")) is x
    assert acc((x,)) is x
    assert acc(x) is x
    for key in ["input", "inputs", "x", "input_ids", "pixel_values", "features"]:
        assert acc({key: x, "label": 0}) is x


def test_accessor_str_int_callable():
    batch_d = {"ids": torch.tensor([9, 8]), "tgt": torch.tensor([1, 1])}
    batch_t = ("a", "b", "c", "d")
    assert make_accessor("ids", "index")(batch_d) is batch_d["ids"]
    assert make_accessor("tgt", "label")(batch_d) is batch_d["tgt"]
    assert make_accessor(2, "index")(batch_t) == "c"
    assert make_accessor(0, "label")(batch_t) == "a"

    def fn(b):
        return b["ids"] + 1

    acc = make_accessor(fn, "index")
    assert acc is fn
    assert torch.equal(acc(batch_d), torch.tensor([10, 9]))


@pytest.mark.parametrize("spec", [1.5, b"index", ["index"], ("index",)])
def test_accessor_bad_spec_type(spec):
    with pytest.raises(TypeError, match="index_key"):
        make_accessor(spec, "index")


# ---------------------------------------------------------------------------------- get_indices

_IDX = make_accessor(None, "index")


def test_get_indices_returns_int64():
    for raw in [torch.tensor([3, 1, 2], dtype=torch.int32), [3, 1, 2], np.array([3, 1, 2])]:
        out = get_indices((torch.zeros(3, 2), torch.zeros(3), raw), _IDX, num_samples=4)
        assert out.dtype == torch.int64
        assert out.tolist() == [3, 1, 2]
    out = get_indices({"index": torch.tensor([0, 5], dtype=torch.int16)}, _IDX)
    assert out.dtype == torch.int64 and out.tolist() == [0, 5]


@pytest.mark.parametrize(
    "batch",
    [
        torch.zeros(4, 3),
        {"x": torch.zeros(4, 3), "label": torch.zeros(4)},
        (torch.zeros(4, 3),),
        (torch.zeros(4, 3), torch.arange(4)),
    ],
    ids=["bare-tensor", "dict-without-index", "1-tuple", "x-y-tuple"],
)
def test_get_indices_missing_index_shows_how_to_wrap(batch):
    with pytest.raises(MissingIndexError) as info:
        get_indices(batch, _IDX)
    msg = str(info.value)
    assert "IndexedDataset" in msg
    assert "DataLoader" in msg
    assert "index_key" in msg
    assert isinstance(info.value, ValueError)


def test_get_indices_missing_index_describes_dict_keys():
    with pytest.raises(MissingIndexError, match=r"keys \['label', 'x'\]"):
        get_indices({"x": torch.zeros(2), "label": torch.zeros(2)}, _IDX)


@pytest.mark.parametrize(
    "raw",
    [
        torch.tensor([0.0, 1.0]),
        torch.tensor([True, False]),
        torch.tensor(3),
        torch.zeros(2, 2).long(),
    ],
    ids=["float", "bool", "0-d", "2-d"],
)
def test_get_indices_non_integer_vector_is_missing_index(raw):
    with pytest.raises(MissingIndexError, match="IndexedDataset"):
        get_indices({"index": raw}, _IDX)


def test_get_indices_out_of_range():
    with pytest.raises(SampleIndexError) as info:
        get_indices({"index": torch.tensor([0, 10, 3])}, _IDX, num_samples=10)
    msg = str(info.value)
    assert "Sample index 10 " in msg and "[0, 10)" in msg

    with pytest.raises(SampleIndexError) as info:
        get_indices({"index": torch.tensor([-1, 2])}, _IDX, num_samples=7)
    msg = str(info.value)
    assert "Sample index -1 " in msg and "[0, 7)" in msg

    # the last valid position passes; no range check without num_samples
    assert get_indices({"index": torch.tensor([9, 0])}, _IDX, num_samples=10).tolist() == [9, 0]
    assert get_indices({"index": torch.tensor([123])}, _IDX).tolist() == [123]


def test_get_indices_duplicates():
    batch = {"index": torch.tensor([4, 1, 4, 2, 1])}
    with pytest.raises(SampleIndexError) as info:
        get_indices(batch, _IDX, num_samples=5)
    assert "[1, 4]" in str(info.value)
    assert "more than once" in str(info.value)
    out = get_indices(batch, _IDX, num_samples=5, check_duplicates=False)
    assert out.tolist() == [4, 1, 4, 2, 1]


def test_get_indices_empty_batch():
    out = get_indices({"index": torch.zeros(0, dtype=torch.long)}, _IDX, num_samples=3)
    assert out.shape == (0,) and out.dtype == torch.int64


def test_get_indices_unwrapped_xy_loader_then_wrapped():
    x, y = torch.randn(9, 2), torch.arange(9) % 3
    batch = next(iter(DataLoader(TensorDataset(x, y), batch_size=4)))
    with pytest.raises(MissingIndexError, match="a list of 2 elements"):
        get_indices(batch, _IDX, num_samples=9)
    # bare items wrapped by IndexedDataset give (x, index): read it with index_key=1
    batch = next(iter(DataLoader(IndexedDataset(x), batch_size=4)))
    got = get_indices(batch, make_accessor(1, "index"), num_samples=9)
    assert torch.equal(got, torch.arange(4))


def test_get_indices_from_indexed_loader():
    x, y = torch.randn(9, 2), torch.arange(9) % 3
    loader = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=4)
    got = torch.cat([get_indices(b, _IDX, num_samples=9) for b in loader])
    assert torch.equal(got, torch.arange(9))


# ---------------------------------------------------------------------------------- get_labels

_LAB = make_accessor(None, "label")


def test_get_labels_ok():
    out = get_labels((torch.zeros(3), torch.tensor([2, 0, 1], dtype=torch.int32), "i"), _LAB)
    assert out.dtype == torch.int64 and out.tolist() == [2, 0, 1]
    out = get_labels({"labels": [1, 1]}, _LAB)
    assert out.tolist() == [1, 1]


def test_get_labels_missing():
    with pytest.raises(MissingLabelError, match="no label.*label_key"):
        get_labels({"x": torch.zeros(2), "index": torch.arange(2)}, _LAB)
    with pytest.raises(MissingLabelError, match="no label"):
        get_labels(torch.zeros(2, 3), _LAB)


def test_get_labels_float():
    with pytest.raises(MissingLabelError, match=r"integer class ids.*torch\.float32"):
        get_labels({"label": torch.tensor([0.0, 1.0])}, _LAB)
    with pytest.raises(MissingLabelError, match="integer class ids"):
        get_labels({"label": torch.tensor([True, False])}, _LAB)


def test_get_labels_token_labels():
    with pytest.raises(MissingLabelError, match=r"\(2, 5\) look like token labels"):
        get_labels({"labels": torch.zeros(2, 5, dtype=torch.long)}, _LAB)
    # (B, 1) is not token labels, but still not (B,)
    with pytest.raises(MissingLabelError, match="must be"):
        get_labels({"labels": torch.zeros(2, 1, dtype=torch.long)}, _LAB)
