"""The HTML report: its structure (standard-library html.parser) for a real small run and for
partial, older, damaged and empty result folders; AUROC against scikit-learn; write_samples."""

from __future__ import annotations

import base64
import json
import os
import sys
from html.parser import HTMLParser
from typing import Dict, List, Optional

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_memo import (
    ConceptErasure,
    IndexedDataset,
    InfluenceAnalysis,
    MemorizationMonitor,
    TracIn,
)
from lightning_memo.callbacks.reports import write_samples, write_truth
from lightning_memo.report import auroc, find_results, fpr_at_tpr, load_truth, report, roc_curve

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- the page, parsed
class Parsed(HTMLParser):
    """Sections, headings, images, tables (rows of cell texts), notes and scripts of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: List[Dict[str, str]] = []
        self.h2: List[str] = []
        self.images: List[Dict[str, str]] = []
        self.tables: List[Dict[str, object]] = []
        self.notes: List[str] = []
        self.scripts = 0
        self.links: List[str] = []
        self._text: Optional[List[str]] = None
        self._what = ""
        self._row: Optional[List[str]] = None
        self._cell: Optional[List[str]] = None
        self._in_body = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a)
        elif tag == "script":
            self.scripts += 1
        elif tag in ("a", "link"):
            self.links.append(a.get("href", ""))
        elif tag == "img":
            self.images.append(
                {**a, "section": self.sections[-1]["class"] if self.sections else ""}
            )
        elif tag == "h2" or (tag == "p" and "note" in a.get("class", "")):
            self._text, self._what = [], tag if tag == "h2" else "note"
        elif tag == "table":
            self.tables.append({"class": a.get("class", ""), "rows": []})
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "h2" and self._what == "h2" or tag == "p" and self._what == "note":
            text = "".join(self._text or []).strip()
            (self.h2 if tag == "h2" else self.notes).append(text)
            self._text, self._what = None, ""
        elif tag == "td" and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1]["rows"].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def tables_of(self, cls: str) -> List[List[List[str]]]:
        return [t["rows"] for t in self.tables if t["class"] == cls]

    def kinds(self) -> List[str]:
        return [s["class"] for s in self.sections]

    def has_note(self, *words: str) -> bool:
        return any(all(w in n for w in words) for n in self.notes)


def parse(path: str) -> Parsed:
    with open(path, encoding="utf-8") as f:
        return Parsed(f.read())


def check_images(page: Parsed) -> None:
    """Every image is an inline PNG data URI that decodes as PNG."""
    assert page.images
    for im in page.images:
        src = im["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)


# ---------------------------------------------------------------------------- a real small run
def image_data(n: int, seed: int = 0, flip: float = 0.1):
    """8x8 'images' of 3 classes (a bar across, a bar down, a diagonal) plus noise; a fraction
    ``flip`` of the labels is flipped. Returns x (n, 64), noisy labels (n,), flipped (n,) bool."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(3, 8, 8)
    t[0, 3:5, :] = 1
    t[1, :, 3:5] = 1
    t[2] = torch.eye(8) + torch.eye(8).roll(1, 1)
    y = torch.arange(n) % 3
    x = (t[y] + 0.25 * torch.randn(n, 8, 8, generator=g)).reshape(n, 64)
    flipped = torch.rand(n, generator=g) < flip
    noisy = torch.where(flipped, (y + 1 + torch.randint(0, 2, (n,), generator=g)) % 3, y)
    return x, noisy, flipped


class ImageMLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    def per_sample_loss(self, batch):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="none")

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def concept(batch) -> torch.Tensor:
    """The erased concept: is the image's top-left quarter bright (module level: picklable)."""
    return (batch[0][:, :4].mean(dim=1) > 0).long()


def make_run(root: str, n: int = 60, epochs: int = 3, samples: bool = True) -> str:
    """A 3-epoch fit with the four callbacks (default folders under ``root``), the recorded
    samples and queries, and truth.csv (the flipped labels). Returns ``root``."""
    x, y, flipped = image_data(n)
    xq, yq, _ = image_data(12, seed=1, flip=0.0)
    train = DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=10)
    queries = DataLoader(IndexedDataset(TensorDataset(xq, yq)), batch_size=6)
    cbs = [
        MemorizationMonitor("fc2", n_estimators=200, warn_below=0.0, patience=1),
        TracIn(layers=["fc1", "head"], projection_dim=None, queries=queries, progress=False),
        InfluenceAnalysis(
            "ekfac",
            layers=["fc1", "head"],
            queries=queries,
            fisher="empirical",
            damping=1e-3,
            cache=False,
            progress=False,
        ),
        ConceptErasure("fc1", concept=concept, when="fit_start"),
    ]
    L.seed_everything(0, verbose=False)
    L.Trainer(
        max_epochs=epochs,
        callbacks=cbs,
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    ).fit(ImageMLP(), train)
    out = os.path.join(root, "lightning_memo")
    if samples:
        ds, qds = train.dataset, queries.dataset
        get_x, get_y = (lambda it: it[0]), (lambda it: it[1])
        items = {i: ds[i] for i in range(n)}
        write_samples(os.path.join(out, "memorization"), items, get_x, get_y, image_shape=(8, 8))
        q_items = {i: qds[i] for i in range(len(qds))}
        for name in ("tracin", "influence"):
            d = os.path.join(out, name)
            write_samples(d, q_items, get_x, get_y, image_shape=(8, 8), name="queries")
    write_truth(root, flipped)
    return root


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    return make_run(str(tmp_path_factory.mktemp("run")))


def test_real_run_sections_images_tables(real_run):
    path = report(real_run)
    assert path == os.path.join(real_run, "report.html")
    page = parse(path)
    assert page.kinds() == ["memorization", "tracin", "influence", "erasure"]
    assert page.h2 == ["Memorization (PSMI)", "TracIn", "Influence", "Concept erasure"]
    assert page.scripts == 0
    assert all(h.startswith("#") for h in page.links)  # no network, links inside the page only
    check_images(page)
    charts = [im for im in page.images if im.get("class") == "chart"]
    files = sorted(os.listdir(os.path.join(real_run, "report_files")))
    assert sorted(im["data-file"] for im in charts) == files
    for im in charts:  # the file beside the page is the inlined picture
        with open(os.path.join(real_run, "report_files", im["data-file"]), "rb") as f:
            assert base64.b64encode(f.read()).decode() == im["src"].split(",", 1)[1]
    memo = os.path.join(real_run, "lightning_memo", "memorization")
    with open(os.path.join(memo, "flagged.csv")) as f:
        n_flagged = len(f.read().strip().splitlines()) - 1
    assert n_flagged > 0
    (flagged,) = page.tables_of("flagged")
    assert len(flagged) == min(n_flagged, 100)
    first = [int(r[2]) for r in flagged]
    assert first == sorted(first)  # sorted by first-flag epoch
    assert all(r[1] in ("0", "1", "2") for r in flagged)  # labels
    # sparkline per row, thumbnail per row (samples were recorded for every training sample)
    thumbs = [im for im in page.images if im.get("class") == "thumb"]
    assert len(thumbs) >= n_flagged
    (auc,) = page.tables_of("auroc")  # truth.csv was recorded: one row per epoch
    assert [r[0] for r in auc] == ["0", "1", "2"]
    top = page.tables_of("top")
    assert len(top) == 2 and all(len(t) == 10 for t in top)  # TracIn and influence
    queries = page.tables_of("query")
    assert len(queries) == 6 and all(len(q) == 5 for q in queries)  # 3 queries x 2 sections
    (erasure,) = page.tables_of("erasure")
    assert len(erasure) == 1 and erasure[0][1] == "fc1"
    before, after, majority = (float(v) for v in erasure[0][2:5])
    assert before > after and abs(after - majority) < 0.2
    assert page.has_note("no timings")  # the callbacks do not time yet
    logs = [f for _, _, fs in os.walk(real_run) for f in fs if "tfevents" in f]
    assert logs == []  # logger=False: no TensorBoard, nothing missing from the page


def test_report_size_and_custom_out(real_run, tmp_path):
    out = str(tmp_path / "sub" / "mine.html")
    assert report(real_run, out=out) == out
    assert os.path.isdir(tmp_path / "sub" / "mine_files")
    assert os.path.getsize(out) < 1_500_000


def test_truth_argument_overrides_and_bad_truth(real_run, tmp_path):
    truth = tmp_path / "t.csv"
    truth.write_text("index,flag\n" + "".join(f"{i},{int(i < 30)}\n" for i in range(60)))
    page = parse(report(real_run, out=str(tmp_path / "r.html"), truth=str(truth)))
    assert page.tables_of("auroc") and "t.csv" in open(tmp_path / "r.html").read()
    with pytest.raises(FileNotFoundError, match="truth file"):
        report(real_run, out=str(tmp_path / "r.html"), truth=str(tmp_path / "none.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="index"):
        report(real_run, out=str(tmp_path / "r.html"), truth=str(bad))
    bad.write_text("index,flag\n1,maybe\n")
    with pytest.raises(ValueError, match="maybe"):
        load_truth(str(bad))


# ---------------------------------------------------------------------------- AUROC
@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_sklearn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    y = rng.random(n) < rng.uniform(0.05, 0.6)
    y[0], y[1] = True, False
    s = rng.normal(size=n) + y * rng.uniform(0, 2)
    if seed % 2:  # ties
        s = np.round(s, 1)
    assert auroc(s, y) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    fpr, tpr = roc_curve(s, y)
    f2, t2, _ = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    assert fpr_at_tpr(s, y, 0.75) == pytest.approx(f2[np.argmax(t2 >= 0.75)])


def test_auroc_edge_cases():
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([1, 1])))
    assert auroc(np.array([1.0, np.nan, 3.0]), np.array([0, 1, 1])) == 1.0
    assert auroc(np.array([5.0, 5.0, 5.0, 5.0]), np.array([0, 1, 0, 1])) == 0.5
    assert np.isnan(fpr_at_tpr(np.zeros(3), np.zeros(3)))


# ---------------------------------------------------------------------------- written files
def csv_text(header, rows) -> str:
    return ",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)


def write_memo(
    d,
    epochs=(0, 1, 2),
    n=30,
    layers=("net.1",),
    baselines=True,
    std=True,
    flag_col=True,
    flagged_csv=True,
    config=True,
    history=True,
):
    """A MemorizationMonitor folder written by hand (the samples i < 5 flagged at epoch 1)."""
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    header = ["index", "label"]
    for la in layers:
        header += [f"{la}/psmi_mean"] + ([f"{la}/psmi_std"] if std else [])
    header += ["loss", "margin"] if baselines else []
    header += ["flagged"] if flag_col else []
    for e in epochs:
        rows = []
        for i in range(n):
            r = [i, i % 3]
            for _ in layers:
                r += [round(rng.normal(0.5 if i >= 5 else -0.3, 0.1), 4)] + ([0.1] if std else [])
            r += [round(rng.random() * 2, 3), round(rng.normal(), 3)] if baselines else []
            r += [int(i < 5 and e >= 1)] if flag_col else []
            rows.append(r)
        with open(os.path.join(d, f"epoch_{e}.csv"), "w") as f:
            f.write(csv_text(header, rows))
    if flagged_csv:
        with open(os.path.join(d, "flagged.csv"), "w") as f:
            f.write(
                csv_text(["index", "label", "epoch_flagged"], [[i, i % 3, 1] for i in range(5)])
            )
    if config:
        cfg = {"layers": list(layers), "flag_layer": layers[-1], "every_n_epochs": 1}
        cfg.update(warn_below=0.0, patience=2, num_samples=n)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
    if history:
        hist = [{"epoch": e, "n_flagged": 5 if e >= 1 else 0, "new_flagged": []} for e in epochs]
        with open(os.path.join(d, "history.json"), "w") as f:
            json.dump(hist, f)


def write_tracin(d, n=30, top_k=True, config=True, label=True):
    os.makedirs(d, exist_ok=True)
    header = ["index"] + (["label"] if label else []) + ["self_influence", "rank"]
    si = np.linspace(1, 0, n)
    rows = [[i] + ([i % 3] if label else []) + [si[i], i] for i in range(n)]
    with open(os.path.join(d, "self_influence.csv"), "w") as f:
        f.write(csv_text(header, rows))
    if top_k:
        rows = [
            [q, r, r, 1.0 - r / 10, n - 1 - r, -1.0 + r / 10] for q in range(4) for r in range(3)
        ]
        hdr = ["query", "rank", "proponent", "proponent_score", "opponent", "opponent_score"]
        with open(os.path.join(d, "top_k.csv"), "w") as f:
            f.write(csv_text(hdr, rows))
    if config:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"mode": "checkpoints", "projection_dim": None, "layers": ["net.0"]}, f)


def write_erasure(d, probe=True):
    os.makedirs(d, exist_ok=True)
    info = {"n_rows": 30, "rank": 1, "edit_norm": 0.7}
    if probe:
        info.update(probe_acc_before=0.95, probe_acc_after=0.52, majority_rate=0.5)
    hist = [{"epoch": e, "layers": {"net.0": dict(info)}} for e in (0, 1)]
    with open(os.path.join(d, "history.json"), "w") as f:
        json.dump(hist, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"layers": ["net.0"], "when": "epoch_end", "method": "leace", "z_dim": 2}, f)


def test_empty_folder(tmp_path):
    page = parse(report(str(tmp_path)))
    assert page.sections == []
    assert page.has_note("No result folder")
    assert os.path.isfile(tmp_path / "report.html")


def test_missing_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        report(str(tmp_path / "nope"))


def test_only_one_callback(tmp_path):
    write_tracin(tmp_path / "lightning_memo" / "tracin")
    page = parse(report(str(tmp_path)))
    assert page.kinds() == ["tracin"]
    assert page.has_note("Not in this run", "Memorization", "Influence", "Concept erasure")
    assert page.has_note("No samples were recorded")
    (top,) = page.tables_of("top")
    assert [r[1] for r in top] == [str(i) for i in range(10)]  # highest self-influence first
    assert len(page.tables_of("query")) == 3 and page.has_note("1 more queries")
    check_images(page)


def test_run_dir_is_the_callback_folder(tmp_path):
    write_memo(tmp_path)
    page = parse(report(str(tmp_path)))
    assert page.kinds() == ["memorization"]
    (flagged,) = page.tables_of("flagged")
    assert sorted(int(r[0]) for r in flagged) == list(range(5))
    assert page.has_note("Not in this run")


def test_some_epochs_only(tmp_path):
    d = tmp_path / "lightning_memo" / "memorization"
    write_memo(d, epochs=(0, 2))
    with open(d / "history.json", "w") as f:
        json.dump([{"epoch": e, "n_flagged": 0, "new_flagged": []} for e in range(4)], f)
    page = parse(report(str(tmp_path)))
    assert page.has_note("epoch(s) 1, 3", "no readable")
    assert page.kinds() == ["memorization"]
    check_images(page)


def test_older_files_missing_columns(tmp_path):
    d = tmp_path / "memorization"
    write_memo(
        d,
        baselines=False,
        std=False,
        flag_col=False,
        flagged_csv=False,
        config=False,
        history=False,
    )
    page = parse(report(str(tmp_path)))
    assert page.has_note("No loss / margin column")
    assert page.has_note("No config.json")
    assert page.has_note("No flagged.csv and no flagged column")
    (low,) = page.tables_of("flagged")  # no flags known: the lowest-PSMI samples
    assert len(low) == 10 and all(int(r[0]) < 5 for r in low[:5])
    check_images(page)


def test_flags_from_flag_column(tmp_path):
    write_memo(tmp_path / "memorization", flagged_csv=False)
    page = parse(report(str(tmp_path)))
    assert page.has_note("first-flag epochs are read from the epoch CSVs")
    (flagged,) = page.tables_of("flagged")
    assert sorted(int(r[0]) for r in flagged) == list(range(5))
    assert {r[2] for r in flagged} == {"1"}


def test_truth_scores_and_one_class(tmp_path):
    write_memo(tmp_path / "memorization")
    write_truth(str(tmp_path), {i: i < 5 for i in range(30)})
    page = parse(report(str(tmp_path)))
    (auc,) = page.tables_of("auroc")
    assert len(auc) == 3
    assert float(auc[0][1]) > 0.9  # -PSMI finds the low-PSMI samples
    write_truth(str(tmp_path), {i: False for i in range(30)})
    page = parse(report(str(tmp_path)))
    assert page.has_note("need both") and not page.tables_of("auroc")


def test_stopped_before_first_epoch_and_empty_folders(tmp_path):
    lm = tmp_path / "lightning_memo"
    write_memo(lm / "memorization", epochs=(), flagged_csv=False, history=False)
    os.makedirs(lm / "tracin")
    os.makedirs(lm / "erasure")
    page = parse(report(str(tmp_path)))
    assert page.kinds() == ["memorization", "tracin", "erasure"]
    assert page.has_note("No readable epoch_<E>.csv")
    assert page.has_note("lightning_memo/tracin/ holds no result files")
    assert page.has_note("self_influence.csv is missing")
    assert page.has_note("No history.json")


def test_damaged_files(tmp_path):
    d = tmp_path / "memorization"
    write_memo(d)
    with open(d / "config.json", "w") as f:
        f.write("{not json")
    with open(d / "epoch_1.csv", "a") as f:
        f.write("1,2\n")  # a short row
    with open(d / "epoch_2.csv", "w") as f:
        f.write("")
    write_erasure(tmp_path / "erasure", probe=False)
    page = parse(report(str(tmp_path)))
    assert page.has_note("config.json could not be read")
    assert page.has_note("epoch_1.csv: 1 damaged row")
    assert page.has_note("epoch_2.csv is empty")
    assert page.has_note("net.0 have no probe score")
    assert page.kinds() == ["memorization", "erasure"]


def test_erasure_table(tmp_path):
    write_erasure(tmp_path / "erasure")
    page = parse(report(str(tmp_path)))
    (rows,) = page.tables_of("erasure")
    assert [r[:5] for r in rows] == [[e, "net.0", "0.95", "0.52", "0.5"] for e in ("0", "1")]
    check_images(page)


def test_tracin_without_queries_or_labels(tmp_path):
    write_tracin(tmp_path / "tracin", top_k=False, label=False)
    page = parse(report(str(tmp_path)))
    assert page.has_note("No top_k.csv")
    (top,) = page.tables_of("top")
    assert top[0][2] == "–"  # unknown label


def test_several_instances(tmp_path):
    write_memo(tmp_path / "lightning_memo" / "memorization" / "layers=net.1")
    write_memo(tmp_path / "lightning_memo" / "memorization" / "layers=net.3", layers=("net.3",))
    page = parse(report(str(tmp_path)))
    assert page.kinds() == ["memorization", "memorization"]
    assert len({s["id"] for s in page.sections}) == 2
    assert len(os.listdir(tmp_path / "report_files")) == len(
        [im for im in page.images if im.get("class") == "chart"]
    )


def test_a_failing_section_does_not_stop_the_page(tmp_path, monkeypatch):
    from lightning_memo.report import _memorization

    write_memo(tmp_path / "memorization")
    write_erasure(tmp_path / "erasure")

    def boom(rd, ctx):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(_memorization, "build", boom)
    monkeypatch.setitem(sys.modules["lightning_memo.report"]._BUILDERS, "memorization", boom)
    page = parse(report(str(tmp_path)))
    assert page.has_note("could not be built", "synthetic failure")
    assert page.kinds() == ["memorization", "erasure"]
    assert page.tables_of("erasure")


def test_text_is_escaped(tmp_path):
    d = tmp_path / "memorization"
    write_memo(d, layers=("<script>x</script>",))
    write_samples(
        str(d), {0: {"text": "<b>bold & raw</b>", "label": 1}}, None, lambda it: it["label"]
    )
    text = open(report(str(tmp_path))).read()
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "&lt;b&gt;bold &amp; raw&lt;/b&gt;" in text


def test_missing_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install lightning_memo\[report\]"):
        report(str(tmp_path))


def test_find_results_by_content(tmp_path):
    write_memo(tmp_path / "a" / "my_monitor")  # an output_dir= of any name
    write_tracin(tmp_path / "b")
    write_erasure(tmp_path / "c")
    found, notes = find_results(str(tmp_path))
    assert [(r.kind, r.rel) for r in found] == [
        ("memorization", "a/my_monitor"),
        ("tracin", "b"),
        ("erasure", "c"),
    ]
    assert notes == []


# ---------------------------------------------------------------------------- write_samples
def test_write_samples_images_text_merge(tmp_path):
    x = torch.rand(4, 64)
    items = {i: (x[i], i % 3, i) for i in range(4)}
    paths = write_samples(
        str(tmp_path), items, lambda it: it[0], lambda it: it[1], image_shape=(8, 8)
    )
    assert sorted(os.path.basename(p) for p in paths) == ["samples.json", "samples.npz"]
    meta = json.load(open(tmp_path / "samples.json"))
    assert meta["3"] == {"label": 0, "text": None}
    with np.load(tmp_path / "samples.npz") as z:
        assert sorted(z.files) == ["0", "1", "2", "3"]
        assert z["0"].dtype == np.uint8 and z["0"].shape == (8, 8, 1)
    big = {9: (torch.rand(3, 100, 60), 1, 9)}
    write_samples(str(tmp_path), big, lambda it: it[0], lambda it: it[1])  # merged
    with np.load(tmp_path / "samples.npz") as z:
        assert "0" in z.files and z["9"].shape == (32, 19, 3)
    write_samples(str(tmp_path), {5: torch.tensor([1.5, 2.0])}, lambda it: it, None)
    assert json.load(open(tmp_path / "samples.json"))["5"]["text"] == "[1.5, 2]"
    write_samples(str(tmp_path), {6: "abc"}, None, None, describe=lambda s: s.upper() * 600)
    t = json.load(open(tmp_path / "samples.json"))["6"]["text"]
    assert t.startswith("ABCABC") and len(t) == 1000


def test_write_truth(tmp_path):
    p = write_truth(str(tmp_path), torch.tensor([True, False, True]))
    assert load_truth(p) == {0: True, 1: False, 2: True}
    p = write_truth(str(tmp_path), {7: 1, 3: 0}, filename="t.csv")
    assert open(p).read() == "index,flag\n3,0\n7,1\n"


def test_non_numeric_columns(tmp_path):
    d = tmp_path / "memorization"
    write_memo(d, epochs=(0, 1))
    with open(d / "epoch_1.csv") as f:
        lines = f.read().splitlines()
    lines[3] = "x," + lines[3].split(",", 1)[1]  # a row whose index is text
    with open(d / "epoch_1.csv", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(d / "flagged.csv", "w") as f:
        f.write("index,label,epoch_flagged\n1,0,1\n,0,1\n")
    write_tracin(tmp_path / "tracin")
    with open(tmp_path / "tracin" / "self_influence.csv", "w") as f:
        f.write("index,label,self_influence,rank\n0,1,high,0\n")
    page = parse(report(str(tmp_path)))
    assert page.has_note("epoch_1.csv has no index")
    assert page.has_note("flagged.csv: 1 row(s) without a valid index")
    assert page.has_note("self_influence.csv has no numeric index / self_influence column")
    assert not page.has_note("could not be built")
    assert page.kinds() == ["memorization", "tracin"]


def test_samples_per_folder(tmp_path):
    t = tmp_path / "a_files" / "tracin"  # a folder named *_files (no a.html beside it): searched
    write_tracin(t)
    write_samples(str(t), {0: {"text": "own zero"}}, None, None)
    write_samples(str(t), {1: {"text": "query one"}}, None, None, name="queries")
    m = tmp_path / "memorization"
    write_memo(m)
    write_samples(str(m), {0: {"text": "other zero"}, 2: {"text": "two"}}, None, None)
    path = report(str(tmp_path))
    page = parse(path)
    assert page.kinds() == ["memorization", "tracin"]
    (top,) = page.tables_of("top")
    cells = {r[1]: r[-1] for r in top}
    assert cells["0"] == "own zero" and cells["2"] == "two"  # the folder's own samples first
    assert "query one" in open(path).read()
    report(str(tmp_path))  # again: report_files/ is not searched, the page is the same
    assert parse(path).kinds() == ["memorization", "tracin"]


def test_report_flag_on_the_callbacks_writes_the_page_at_fit_end(tmp_path):
    """report=True: the run's report.html exists after fit, with the callback's section."""
    from lightning_memo import MemorizationMonitor, TracIn
    from tests.callbacks.helpers import PSMLP, make_loader
    from tests.callbacks.helpers import trainer as make_trainer

    mon = MemorizationMonitor("net.2", source="eval", n_estimators=50, report=True)
    tr = TracIn(layers=["net.4"], projection_dim=None, report=True)
    t = make_trainer(tmp_path, [mon, tr], max_epochs=1)
    t.fit(PSMLP(), make_loader(n=60, batch_size=20))
    run_dir = os.path.dirname(os.path.dirname(mon.out_dir))
    page = os.path.join(run_dir, "report.html")
    assert os.path.exists(page)
    html = open(page, encoding="utf-8").read()
    assert "Memorization" in html and "TracIn" in html
