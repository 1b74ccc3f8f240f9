"""The `lightning-memo` command: `--version`, one subcommand per demo with its own options, the
default demo, and the memorization demo on shipped data."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

import lightning_memo
from lightning_memo.cli import DEFAULT_DEMO, DEMOS, build_parser, main, parse_args
from lightning_memo.demos import run_memorization_demo
from lightning_memo.demos._common import auroc
from lightning_memo.influence.registry import METHODS

# the options each demo's subcommand takes, and nothing else
OPTIONS = {
    "memorization": {"--epochs", "--out", "--seed", "--n-estimators", "--source"},
    "erasure": {"--epochs", "--out", "--seed"},
    "tracin": {"--epochs", "--out", "--seed"},
    "influence": {"--epochs", "--out", "--seed", "--method", "--dataset"},
    "transformer": {"--epochs", "--out", "--seed", "--mode"},
}


def subparser(name):
    """The argparse parser of `lightning-memo demo <name>`."""
    top = build_parser()
    demo = top._subparsers._group_actions[0].choices["demo"]
    return demo._subparsers._group_actions[0].choices[name]


# ---------------------------------------------------------------------------------- the shape
def test_python_m_prints_the_version():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_memo", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert out.strip() == f"lightning-memo {lightning_memo.__version__}"


def test_version_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"lightning-memo {lightning_memo.__version__}"


@pytest.mark.parametrize("name", list(DEMOS))
def test_each_demo_has_its_own_options_and_help(name, capsys):
    assert set(DEMOS) == set(OPTIONS)
    p = subparser(name)
    opts = {s for a in p._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    assert opts == OPTIONS[name]
    with pytest.raises(SystemExit) as exc:
        main(["demo", name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lightning-memo demo {name}")
    for opt in OPTIONS[name]:
        assert opt in out
    assert "``" not in out and ":class:" not in out  # plain words, no reStructuredText


def test_top_and_demo_help_are_plain_words(capsys):
    for argv in ([], ["demo"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "``" not in out and "`" not in out
    assert all(name in out for name in DEMOS)  # `demo --help` lists the demos


def test_options_of_another_demo_are_argparse_errors(capsys):
    for argv in (
        ["demo", "tracin", "--method", "gex"],
        ["demo", "erasure", "--n-estimators", "5"],
        ["demo", "memorization", "--dataset", "digits"],
        ["demo", "influence", "--source", "eval"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        assert "unrecognized arguments" in capsys.readouterr().err, argv


def test_unknown_demo_or_choice_is_refused(capsys):
    for argv in (["demo", "nope"], ["demo", "influence", "--method", "lissa"], ["nope"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_demo_without_a_name_is_the_memorization_demo():
    assert DEFAULT_DEMO == "memorization"
    args = parse_args(["demo"])
    assert (args.which, args.epochs, args.n_estimators, args.out) == (
        "memorization",
        120,
        1000,
        "demo_runs",
    )
    args = parse_args(["demo", "--epochs", "2", "--n-estimators", "100", "--source", "train"])
    assert (args.which, args.epochs, args.n_estimators, args.source) == (
        "memorization",
        2,
        100,
        "train",
    )
    assert parse_args(["demo", "erasure"]).which == "erasure"
    with pytest.raises(SystemExit):  # the default demo's options only
        parse_args(["demo", "--method", "gex"])


def test_defaults_are_the_run_functions_defaults():
    for name in ("memorization", "erasure", "tracin"):
        args = parse_args(["demo", name])
        params = inspect.signature(DEMOS[name]).parameters
        assert args.epochs == params["epochs"].default and args.seed == 0, name
        assert args.out == "demo_runs"
    args = parse_args(["demo", "influence"])
    assert (args.method, args.dataset, args.epochs) == ("all", "digits", None)


def test_influence_methods_come_from_the_registry():
    action = next(a for a in subparser("influence")._actions if "--method" in a.option_strings)
    assert list(action.choices) == [*METHODS, "all"]
    assert "cg" in action.choices
    for m in METHODS:
        assert parse_args(["demo", "influence", "--method", m]).method == m


def test_main_passes_only_the_demos_options(monkeypatch):
    calls = {}

    def fake(name):
        def run(**kw):
            calls[name] = kw

        run.__signature__ = inspect.signature(DEMOS[name])  # the parser reads the defaults
        return run

    for name in DEMOS:
        monkeypatch.setitem(DEMOS, name, fake(name))
    assert main(["demo", "tracin", "--epochs", "3", "--out", "o", "--seed", "2"]) == 0
    assert calls["tracin"] == {"epochs": 3, "out_dir": "o", "seed": 2}
    assert main(["demo", "influence", "--method", "cg", "--dataset", "breast_cancer"]) == 0
    assert calls["influence"] == {
        "out_dir": "demo_runs",
        "seed": 0,
        "method": "cg",
        "dataset": "breast_cancer",
    }  # no --epochs: the dataset's own
    assert main(["demo"]) == 0
    assert calls["memorization"] == {
        "out_dir": "demo_runs",
        "seed": 0,
        "epochs": 120,
        "n_estimators": 1000,
        "source": "eval",
    }


def test_missing_sklearn_is_a_clear_error(monkeypatch, tmp_path, capsys):
    for mod in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert main(["demo", "erasure", "--epochs", "1", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lightning-memo: error: The erasure demo")
    assert "pip install lightning_memo[demo]" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------- the demo
def test_demo_predicts_memorization_early(tmp_path):
    pytest.importorskip("sklearn")
    r = run_memorization_demo(epochs=4, out_dir=str(tmp_path), n_estimators=300, verbose=False)
    assert r["n_flipped"] == 180 and r["flipped"].sum() == 180
    assert [row["epoch"] for row in r["rows"]] == list(range(4))
    # flipped samples carry little information on their (wrong) label from epoch 1 on
    assert auroc(-r["psmi"][1], r["flipped"]) > 0.85
    for row in r["rows"]:  # each AUROC is a number in [0, 1] or NaN when nothing is memorized
        assert r["n_memorized"] == 0 or 0 <= row["auroc_psmi"] <= 1
    assert 0 < r["recall"] <= 1 and 0 < r["precision"] <= 1
    assert os.path.exists(os.path.join(r["monitor_dir"], "epoch_3.csv"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(r["log_dir"]))


def test_cli_prints_the_table(tmp_path, capsys):
    pytest.importorskip("sklearn")
    for argv in (["demo"], ["demo", "memorization"]):
        out_dir = str(tmp_path / argv[-1])
        assert main([*argv, "--epochs", "2", "--n-estimators", "100", "--out", out_dir]) == 0
        out = capsys.readouterr().out
        assert "AUROC" in out and "-PSMI" in out and "tensorboard --logdir" in out
        assert os.path.isdir(os.path.join(out_dir, "memorization_demo"))


def test_report_subcommand_writes_the_page_and_refuses_a_missing_folder(tmp_path, capsys):
    run = tmp_path / "run" / "lightning_memo" / "memorization"
    run.mkdir(parents=True)
    (run / "epoch_0.csv").write_text("index,label,net.1/psmi_mean,net.1/psmi_std,flagged\n"
                                     "0,1,0.5,0.1,0\n1,0,-0.2,0.1,1\n")  # fmt: skip
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").exists()
    assert "r.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "error" in capsys.readouterr().err
