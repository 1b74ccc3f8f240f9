"""Sample texts in the tables: ``describe=`` (default: the items' ``"text"`` field) in the
lowest-PSMI TensorBoard table, ``flagged.csv`` (column ``text``; the epoch CSVs have none) and
``samples.json`` of MemorizationMonitor, and in TracIn's top self-influence table."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("transformers")

from lightning_memo import MemorizationMonitor, TracIn
from lightning_memo.callbacks import memorization, tracin
from tests.hf.helpers import FakeWriter, HFClassifier, fit, tiny_bert, token_items


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("custom", [False, True])
def test_monitor_tables_show_text(tmp_path, monkeypatch, custom):
    writer = FakeWriter()
    monkeypatch.setattr(memorization, "tensorboard_writer", lambda trainer: writer)
    items = token_items()
    describe = (lambda item: item["text"].upper()) if custom else None
    shown = (lambda t: t.upper()) if custom else (lambda t: t)
    mon = MemorizationMonitor("encoder.layer.1", n_estimators=50, warn_below=100.0, patience=1,
                              n_show=4, describe=describe, output_dir=str(tmp_path / "m"),
                              progress=False)  # fmt: skip
    with pytest.warns(UserWarning, match="early warning"):
        fit(tmp_path, HFClassifier(tiny_bert()), [mon], items=items)
    flagged = _rows(tmp_path / "m" / "flagged.csv")
    assert len(flagged) == len(items)  # PSMI < 100 flags every sample
    assert all(r["text"] == shown(items[int(r["index"])]["text"]) for r in flagged)
    assert "text" not in _rows(tmp_path / "m" / "epoch_0.csv")[0]
    (table,) = writer.texts["memo/model.bert.encoder.layer.1/lowest_psmi"]
    lines = table.splitlines()
    assert lines[0] == "| index | label | PSMI | text |" and len(lines) == 2 + 4
    for line in lines[2:]:
        i = int(line.split("|")[1])
        assert line.endswith(f"| {shown(items[i]['text'])} |")
    samples = json.loads((tmp_path / "m" / "samples.json").read_text())
    assert len(samples) == len(items)  # newly flagged and lowest: every sample here
    assert all(s["text"] == shown(items[int(i)]["text"]) for i, s in samples.items())
    assert all(s["label"] == items[int(i)]["label"] for i, s in samples.items())


def test_monitor_without_text_keeps_the_plain_table(tmp_path, monkeypatch):
    writer = FakeWriter()
    monkeypatch.setattr(memorization, "tensorboard_writer", lambda trainer: writer)
    items = [{k: v for k, v in it.items() if k != "text"} for it in token_items()]
    mon = MemorizationMonitor("encoder.layer.1", n_estimators=50, n_show=3, progress=False,
                              output_dir=str(tmp_path / "m"))  # fmt: skip
    fit(tmp_path, HFClassifier(tiny_bert()), [mon], items=items)
    (table,) = writer.texts["memo/model.bert.encoder.layer.1/lowest_psmi"]
    assert table.splitlines()[0] == "| index | label | PSMI |"
    assert _rows(tmp_path / "m" / "flagged.csv") == []
    assert (tmp_path / "m" / "flagged.csv").read_text().startswith("index,label,epoch_flagged,text")


def test_tracin_top_self_influence_table_shows_text(tmp_path, monkeypatch):
    writer = FakeWriter()
    monkeypatch.setattr(tracin, "tensorboard_writer", lambda trainer: writer)
    items = token_items()
    cb = TracIn(layers="classifier", projection_dim=None, output_dir=str(tmp_path / "t"),
                describe=lambda item: "<" + item["text"] + ">", progress=False)  # fmt: skip
    fit(tmp_path, HFClassifier(tiny_bert()), [cb], items=items)
    (table,) = writer.texts["tracin/top_self_influence"]
    lines = table.splitlines()
    assert lines[0] == "| rank | index | label | self-influence | text |"
    si = cb.self_influence
    top = [int(line.split("|")[2]) for line in lines[2:]]
    assert top == si.argsort(descending=True, stable=True)[:16].tolist()
    for line, i in zip(lines[2:], top):
        assert line.endswith(f"| <{items[i]['text']}> |")
    samples = json.loads((tmp_path / "t" / "samples.json").read_text())
    assert sorted(map(int, samples)) == sorted(top)
    assert all(s["text"] == "<" + items[int(i)]["text"] + ">" for i, s in samples.items())


def test_make_describer_and_text_fields_left_out_of_the_forward():
    from lightning_memo.callbacks.common import default_forward
    from lightning_memo.data import make_describer

    assert make_describer()({"text": "hi", "label": 1}) == "hi"
    assert make_describer()({"text": 3}) is None and make_describer()((1, 2)) is None
    assert make_describer(text_key="sentence")({"sentence": "a b"}) == "a b"
    assert make_describer(text_key=None)({"text": "hi"}) is None
    assert make_describer(lambda item: "x")({"text": "hi"}) == "x"
    with pytest.raises(TypeError, match="describe="):
        make_describer("text")

    def forward(**kw):
        return sorted(kw)

    batch = {"input_ids": 1, "attention_mask": 2, "label": 3, "index": 4, "text": ["a", "b"]}
    assert default_forward(forward, batch) == ["attention_mask", "input_ids"]
    assert default_forward(forward, {**batch, "topic": 5}, ["topic"]) == [
        "attention_mask",
        "input_ids",
    ]
