"""The transformer demo (MiniLM + chatterbot, all four callbacks) in its quick mode."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("all_minilm_l6_v2")
pytest.importorskip("chatterbot_corpus")

from lightning_memo.demos.text import flip_labels, load_chatterbot_topics  # noqa: E402
from lightning_memo.demos.transformer import run_transformer_demo  # noqa: E402

pytestmark = pytest.mark.slow


def test_chatterbot_topics_have_one_topic_per_sentence():
    data = load_chatterbot_topics()
    assert len(data.texts) == len(set(data.texts)) == len(data.labels) > 1500
    counts = np.bincount(data.labels, minlength=len(data.topics))
    assert counts.min() >= 20 and len(data.topics) >= 15


def test_flip_labels_moves_the_chosen_share_to_another_class():
    labels = np.arange(200) % 7
    given, flipped = flip_labels(labels, 7, 0.1, seed=3)
    assert flipped.sum() == 20
    assert (given[flipped] != labels[flipped]).all() and (given[~flipped] == labels[~flipped]).all()


def test_quick_run_has_every_callbacks_result_and_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MEMO_CACHE", str(tmp_path / "cache"))
    r = run_transformer_demo(out_dir=str(tmp_path), mode="quick", verbose=False)
    assert r["epochs"] == 1 and len(r["rows"]) == 1
    row = r["rows"][0]
    for key in ("auroc_loss", "auroc_psmi[bert.encoder.layer.5]", "auroc_psmi[classifier:input]"):
        assert key in row
    assert 0.0 <= r["auroc_tracin"] <= 1.0 and 0.0 <= r["auroc_ekfac"] <= 1.0
    # the length bucket is found before erasure and not after (down to the majority rate)
    e = r["erasure"]
    assert e["probe_acc_before"] > e["majority_rate"] + 0.1
    assert e["probe_acc_after"] <= e["majority_rate"] + 0.05
    assert r["flagged"] and all(f["text"] for f in r["flagged"])
    assert r["report"] and os.path.exists(r["report"])
    html = open(r["report"], encoding="utf-8").read()
    assert "Memorization" in html and "TracIn" in html and "erasure" in html.lower()
