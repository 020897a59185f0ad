"""Users' own data (issue 22): per-class metrics in the run files, --select-by, --balance,
CIFAR-100-LT, --folds and check-data. Tiny PNG folders and synthetic CIFAR files, CPU, seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import metrics_rows, write_png_tree
from transferlab.classmetrics import t_interval
from transferlab.cli import main
from transferlab.data.balance import class_weights, sample_weights, suggest_balance
from transferlab.data.cifar import load_cifar100, write_cifar_like
from transferlab.data.subsets import long_tail_counts, long_tail_indices
from transferlab.data.tensor_loader import TensorLoader
from transferlab.errors import UserError
from transferlab.folds import check_fold_counts, stratified_folds
from transferlab.report.mlflow_log import summary_metrics
from transferlab.results import Run
from transferlab.rundir import Summary

TINY = ["--no-progress", "--device", "cpu", "--num-workers", "0", "--batch-size", "16"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here, not in the repo


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """A folder of 3 classes: 40, 12 and 6 PNGs (split into train/val/test by fraction)."""
    root = tmp_path_factory.mktemp("imb") / "data"
    return write_png_tree(root, {"big": 40, "mid": 12, "rare": 6})


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def _train(data: str, run, *flags: str) -> dict:
    code = main(["train", "--data", data, "--run-dir", str(run), *TINY, *flags])
    assert code == 0
    return json.loads((run / "summary.json").read_text())


def test_summary_and_metrics_hold_per_class_metrics(imbalanced, tmp_path):
    run = tmp_path / "run"
    s = _train(f"folder:{imbalanced}", run, "--epochs", "2", "--select-by", "val_balanced_acc")
    for split in ("val", "test"):
        m = s[split]
        assert {"acc", "balanced_acc", "macro_f1", "top5_acc", "per_class"} <= set(m)
        assert [r["class"] for r in m["per_class"]] == ["big", "mid", "rare"]
        recalls = [r["recall"] for r in m["per_class"] if r["support"]]
        assert m["balanced_acc"] == pytest.approx(sum(recalls) / len(recalls), abs=1e-5)
        assert m["top5_acc"] == 1.0  # 3 classes: the true one is always in the top 5
    rows = metrics_rows(run)
    assert len(rows) == 2 and all(0 <= float(r["val_balanced_acc"]) <= 1 for r in rows)
    best = max(rows, key=lambda r: float(r["val_balanced_acc"]))
    assert s["best_epoch"] == int(best["epoch"])
    report = (run / "report.md").read_text()
    assert "Per-class results (test, worst first)" in report and "confusion.png" in report
    assert (run / "confusion.png").is_file()
    api_run = Run(run)  # the API's Run.summary is summary.json: the same per-class figures
    assert api_run.summary.test["per_class"] == s["test"]["per_class"]
    assert "test balanced acc" in api_run._repr_html_()
    logged = summary_metrics(Summary.from_dict(s))  # what MLflow logs at the end of a run
    assert logged["test_balanced_acc_final"] == s["test"]["balanced_acc"]
    assert {"val_macro_f1_final", "test_top5_acc_final"} <= set(logged)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--select-by", "val_f1"], "--select-by must be one of"),
        (["--balance", "oversample"], "--balance must be one of"),
        (["--folds", "1"], "--folds must be at least 2"),
        (["--folds", "-3"], "--folds must be at least 2"),
        (["--folds", "0"], "--folds must be at least 2; got 0 (leave --folds out"),
    ],
)
def test_bad_choices_are_one_line_errors(capsys, imbalanced, tmp_path, flags, message):
    code = main(
        ["train", "--data", f"folder:{imbalanced}", "--run-dir", str(tmp_path / "r")] + TINY + flags
    )
    assert code == 2
    assert message in _one_line_error(capsys)


@pytest.mark.parametrize("ir", ["0", "-5", "abc", "0.5", "inf", ""])
def test_bad_lt_ratio_is_a_one_line_error(capsys, tmp_path, ir):
    code = main(["train", "--data", f"cifar100-lt:{ir}", "--run-dir", str(tmp_path / "r")] + TINY)
    assert code == 2
    assert "imbalance ratio" in _one_line_error(capsys)


# ---------------------------------------------------------------- --balance


def test_class_weights_effective_number_and_inverse():
    counts = torch.tensor([1000, 100, 10, 0])
    eff = class_weights(counts, "effective")
    # Cui et al.: (1 - beta) / (1 - beta^n), beta = 0.999, normalised to sum to 3 (present classes)
    raw = torch.tensor([(1 - 0.999) / (1 - 0.999**n) for n in (1000, 100, 10)], dtype=torch.float64)
    assert eff[:3].double() == pytest.approx((raw * 3 / raw.sum()).tolist(), rel=1e-5)
    assert eff[3] == 0 and float(eff.sum()) == pytest.approx(3.0)
    inv = class_weights(counts, "inverse")
    assert inv[:3].tolist() == pytest.approx([3 * x / 0.111 for x in (0.001, 0.01, 0.1)], rel=1e-5)
    # the effective number weighs the largest class up against plain 1/n
    assert eff[0] / eff[2] > inv[0] / inv[2]


def test_sampler_draws_classes_evenly_and_deterministically():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    w = sample_weights(labels, 3)
    x = torch.zeros(len(labels), 1)
    loader = TensorLoader(x, labels, 100, True, seed=5, sample_weights=w)
    drawn = torch.cat([y for _, y in loader])
    assert len(drawn) == len(labels)
    share = torch.bincount(drawn, minlength=3) / len(drawn)
    assert all(abs(s - 1 / 3) < 0.06 for s in share.tolist())
    again = torch.cat([y for _, y in TensorLoader(x, labels, 100, True, seed=5, sample_weights=w)])
    assert torch.equal(drawn, again)


def test_imbalance_hint_is_one_line(caplog):
    with caplog.at_level(logging.WARNING):
        suggest_balance(torch.tensor([44, 4, 0]), ["big", "small", "none"], "none")
        suggest_balance(torch.tensor([44, 4]), ["big", "small"], "weights")  # already balancing
        suggest_balance(torch.tensor([40, 4]), ["big", "small"], "none")  # 10x: not above
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "11x" in lines[0] and "'small': 4" in lines[0]
    assert "--balance" in lines[0]


@pytest.mark.parametrize("balance", ["weights", "sampler"])
def test_balance_trains_on_pixels(imbalanced, tmp_path, balance):
    s = _train(f"folder:{imbalanced}", tmp_path / "run", "--epochs", "1", "--balance", balance)
    assert s["epochs_run"] == 1 and 0 <= s["test"]["balanced_acc"] <= 1


FROZEN = [
    "--model",
    "resnet18",
    "--weights",
    "none",
    "--image-size",
    "32",
    "--mode",
    "frozen",
    "--engine",
    "torch",
]


def test_balance_sampler_on_cached_features(imbalanced, tmp_path):
    s = _train(
        f"folder:{imbalanced}",
        tmp_path / "run",
        "--epochs",
        "2",
        "--balance",
        "sampler",
        "--cache-dir",
        str(tmp_path / "cache"),
        *FROZEN,
    )
    assert s["feature_cache"] is not None and s["epochs_run"] == 2


# ---------------------------------------------------------------- CIFAR-100-LT


def test_long_tail_profile_is_cao_et_al():
    n = long_tail_counts(100)
    assert n[0] == 500 and n[-1] == 5 and sum(n) == 10847  # LDAM's CIFAR-100-LT, IR 100
    assert n == sorted(n, reverse=True) and long_tail_counts(1) == [500] * 100
    assert sum(long_tail_counts(10)) == 19573 and sum(long_tail_counts(50)) == 12608


def test_long_tail_indices_cap_at_what_a_class_has():
    labels = torch.tensor([0] * 30 + [1] * 30 + [2] * 30)
    idx = long_tail_indices(labels, 100.0)  # 3 classes: 500, 50, 5 wanted
    assert torch.bincount(labels[idx]).tolist() == [30, 30, 5]
    assert idx[-5:].tolist() == list(range(60, 65))  # the first 5 in split order


@pytest.fixture(scope="module")
def lt_cifar(tmp_path_factory):
    return write_cifar_like(tmp_path_factory.mktemp("lt"), n_train=700, n_test=100)


def test_cifar100_lt_pixels_and_features_pick_the_same_images(lt_cifar, tmp_path):
    common = ["--data-dir", str(lt_cifar), "--val-size", "100", "--epochs", "1", "--no-report"]
    pixels = _train("cifar100-lt:100", tmp_path / "px", *common, "--batch-size", "50")
    feats = _train(
        "cifar100-lt:100", tmp_path / "ft", *common, *FROZEN, "--cache-dir", str(tmp_path / "c")
    )
    ds = load_cifar100(lt_cifar, False, 0, 100)
    want = long_tail_counts(100)
    have = torch.bincount(ds.train.labels, minlength=100).tolist()
    expected = sum(min(w, h) for w, h in zip(want, have, strict=True))
    assert pixels["data"]["n"]["train"] == feats["data"]["n"]["train"] == expected
    assert pixels["test"]["per_class"][0]["support"] == 1  # the test split stays balanced


# ---------------------------------------------------------------- check-data


def _planted(root):
    """train/test folders of textured PNGs with planted copies: 2 exact leaks (one renamed),
    1 near leak (resized + JPEG), 1 exact duplicate inside train, 1 copy under another class,
    1 corrupt file, 1 grayscale and 1 RGBA image, 1 16-bit PNG."""
    rng = np.random.default_rng(0)

    def texture(seed, size=32):
        g = np.random.default_rng(seed)
        base = g.integers(0, 256, (4, 4, 3)).astype(np.uint8)  # smooth blocks: a stable dHash
        img = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(img)

    k = 0
    for split, n in (("train", 6), ("test", 3)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                k += 1
                Image.fromarray(texture(1000 + k)).save(root / split / cls / f"{i}.png")
    tr, te = root / "train", root / "test"
    shutil.copy(tr / "cat/0.png", te / "cat/leak_exact.png")
    shutil.copy(tr / "dog/1.png", te / "dog/renamed.png")
    Image.open(tr / "cat/2.png").resize((48, 48)).convert("RGB").save(
        te / "cat/near.jpg", quality=90
    )
    shutil.copy(tr / "cat/3.png", tr / "cat/dup_in_train.png")
    shutil.copy(tr / "dog/4.png", tr / "cat/wrong_class.png")
    (tr / "dog/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(40))
    Image.fromarray(texture(7)).convert("L").save(tr / "dog/gray.png")
    Image.fromarray(texture(8)).convert("RGBA").save(tr / "dog/alpha.png")
    Image.fromarray(texture(9)[:, :, 0].astype(np.uint16) * 257).save(tr / "dog/deep.png")
    return root


def test_check_data_finds_every_planted_pair_and_invents_none(tmp_path, capsys, near="dhash"):
    data = _planted(tmp_path / "data")
    out = tmp_path / "out"
    code = main(
        ["check-data", str(data), "--out", str(out), "--json", "--num-workers", "0", "--near", near]
    )
    assert code == 0
    r = json.loads(capsys.readouterr().out)

    def names(pairs):
        return {
            tuple(
                sorted(
                    (
                        Path(p["a"]).relative_to(data).as_posix(),
                        Path(p["b"]).relative_to(data).as_posix(),
                    )
                )
            )
            + (p["kind"],)
            for p in pairs
        }

    assert names(r["leaks"]) == {
        ("test/cat/leak_exact.png", "train/cat/0.png", "exact"),
        ("test/dog/renamed.png", "train/dog/1.png", "exact"),
        ("test/cat/near.jpg", "train/cat/2.png", "near"),
    }
    assert names(r["exact_within"]) == {
        ("train/cat/3.png", "train/cat/dup_in_train.png", "exact"),
        ("train/cat/wrong_class.png", "train/dog/4.png", "exact"),
    }
    assert names(r["label_conflicts"]) == {
        ("train/cat/wrong_class.png", "train/dog/4.png", "exact")
    }
    assert [Path(p).name for p in r["bad"]] == ["broken.png"]
    modes = {m.split()[0]: [Path(f).name for f in fs] for m, fs in r["modes"].items()}
    assert modes["L"] == ["gray.png"] and modes["RGBA"] == ["alpha.png"]
    assert any(m.startswith("I") for m in modes) and ["deep.png"] in modes.values()
    assert r["counts"]["test"] == {"cat": 5, "dog": 4}
    md = (out / "data_report.md").read_text()
    assert "leak_exact.png" in md and "near.jpg" in md and (out / "data_report.html").is_file()
    assert sorted(p.name for p in (data / "test" / "cat").iterdir()) == [
        "0.png",
        "1.png",
        "2.png",
        "leak_exact.png",
        "near.jpg",
    ]  # nothing deleted or moved


def test_train_warns_in_one_line_about_exact_test_leaks(tmp_path, caplog):
    data = _planted(tmp_path / "data")
    (data / "train/dog/broken.png").unlink()
    with caplog.at_level(logging.WARNING):
        _train(f"folder:{data}", tmp_path / "run", "--epochs", "1", "--no-report")
    lines = [r.getMessage() for r in caplog.records if "exact copies" in r.getMessage()]
    # 2 planted; one of their train originals may be carved into val (no val/ folder)
    assert len(lines) == 1 and lines[0][:16] in ("1 test image(s) ", "2 test image(s) ")


def test_check_data_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.png").write_bytes(b"x")
    for c in ("a", "b"):
        (tmp_path / "texts" / c).mkdir(parents=True)
        (tmp_path / "texts" / c / "notes.txt").write_text("hello")
    for target, message in (
        ("empty", "class folder"),
        ("file.png", "is a file, not a folder"),
        ("texts", "no image files"),
    ):
        code = main(["check-data", str(tmp_path / target), "--out", str(tmp_path / "o")])
        assert code == 2, target
        assert message in _one_line_error(capsys)


# ---------------------------------------------------------------- --folds


def test_stratified_folds_deal_each_class_evenly():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    fold = stratified_folds(labels, 3, seed=0)
    for c, n in ((0, 10), (1, 7), (2, 3)):
        per = torch.bincount(fold[labels == c], minlength=3).tolist()
        assert sum(per) == n and max(per) - min(per) <= 1
    assert torch.equal(fold, stratified_folds(labels, 3, seed=0))


def test_fold_counts_refuse_with_the_class_named():
    with pytest.raises(UserError, match="class 'solo' has 1 image"):
        check_fold_counts(torch.tensor([0, 0, 0, 1]), ["many", "solo"], 2)
    with pytest.raises(UserError, match="--folds 4: class 'few' has only 3 images.*--folds 3"):
        check_fold_counts(torch.tensor([0] * 9 + [1] * 3), ["many", "few"], 4)
    check_fold_counts(torch.tensor([0] * 9 + [1] * 3), ["many", "few"], 3)


def test_fold_interval_is_student_t():
    m, h = t_interval([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and h == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-5)


@pytest.mark.parametrize("frozen", [False, True])
def test_folds_run_k_fold_dirs_and_the_best_fold_is_the_model(imbalanced, tmp_path, frozen):
    run = tmp_path / "k3"
    extra = [*FROZEN, "--cache-dir", str(tmp_path / "cache")] if frozen else []
    s = _train(f"folder:{imbalanced}", run, "--folds", "3", "--epochs", "1", *extra)
    folds = s["folds"]
    assert folds["k"] == 3 and len(folds["per_fold"]) == 3
    for i in (1, 2, 3):
        fs = json.loads((run / f"fold-{i}" / "summary.json").read_text())
        assert fs["test"]["acc"] == folds["per_fold"][i - 1]["test_acc"]
    accs = [p["test_acc"] for p in folds["per_fold"]]
    assert folds["test_acc"]["mean"] == pytest.approx(sum(accs) / 3)
    assert folds["test_acc"]["low"] <= folds["test_acc"]["mean"] <= folds["test_acc"]["high"]
    logged = summary_metrics(Summary.from_dict(s))  # MLflow's figures of a k-fold run
    assert logged["folds_test_acc_mean"] == pytest.approx(folds["test_acc"]["mean"])
    best = folds["final_model"]["fold"]
    assert (run / "best.pt").read_bytes() == (run / f"fold-{best}" / "best.pt").read_bytes()
    assert "3-fold estimate" in (run / "report.md").read_text()
    # the val splits of the folds are disjoint and cover train+val
    n_val = [json.loads((run / f"fold-{i}" / "summary.json").read_text())["val"] for i in (1, 2, 3)]
    assert sum(sum(r["support"] for r in v["per_class"]) for v in n_val) > 0
    if frozen:  # one extraction shared by every fold: train, val, test in the cache once each
        from transferlab.features import cache as fcache

        entries = fcache.list_entries(tmp_path / "cache")
        assert sorted(e["split"] for e in entries if e.get("split")) == ["test", "train", "val"]
    code = main(["predict", str(run), str(imbalanced / "rare")])
    assert code == 0


def test_folds_bad_input_is_one_line(capsys, tmp_path):
    data = write_png_tree(tmp_path / "d", {"many": 12, "few": 3})
    code = main(
        [
            "train",
            "--data",
            f"folder:{data}",
            "--run-dir",
            str(tmp_path / "r"),
            "--folds",
            "5",
            *TINY,
        ]
    )
    assert code == 2
    err = _one_line_error(capsys)
    assert "'few'" in err and "--folds" in err


@pytest.mark.slow
def test_check_data_lite0_near_invents_no_pair(tmp_path, capsys):
    """--near lite0 (centred cosine >= 0.95): the exact leaks, and no pair that was not planted
    (it misses the small resized copy here: why dHash is the default; data/check.py)."""
    data = _planted(tmp_path / "data")
    argv = ["check-data", str(data), "--out", str(tmp_path / "o"), "--json", "--near", "lite0"]
    assert main([*argv, "--num-workers", "0"]) == 0
    r = json.loads(capsys.readouterr().out)
    found = {tuple(sorted((Path(p["a"]).name, Path(p["b"]).name))) for p in r["leaks"]}
    assert {("0.png", "leak_exact.png"), ("1.png", "renamed.png")} <= found
    assert found <= {("0.png", "leak_exact.png"), ("1.png", "renamed.png"), ("2.png", "near.jpg")}
