"""Feature cache: cached heads match live heads, keys never go stale, bad files are rebuilt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image, ImageOps

from conftest import write_png_tree
from transferlab.cli import main
from transferlab.data.cifar import write_cifar_like
from transferlab.features import cache as fcache
from transferlab.features import content
from transferlab.training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    data = write_cifar_like(root / "data", 300, 100, n_classes=10)
    weights = root / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    return root, data, weights


def _train(root: Path, data: Path, weights: Path, name: str, *extra: str) -> dict:
    run = root / name
    args = [
        "train",
        "--data-dir",
        str(data),
        "--val-size",
        "60",
        "--model",
        "resnet18",
        "--weights",
        str(weights),
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "40",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--cache-dir",
        str(root / "cache"),
        "--run-dir",
        str(run),
        "--no-progress",
        "--overwrite",
        "--engine",
        "torch",
        "--no-report",  # report.md/html (Grad-CAM, plots) are test_reports.py's claim, not these
        *extra,
    ]  # torch: the live path runs the same kernels
    assert main(args) == 0
    return json.loads((run / "summary.json").read_text())


def test_cached_head_matches_live_head(setup):
    root, data, weights = setup
    cached = _train(root, data, weights, "cached")
    live = _train(root, data, weights, "live", "--no-feature-cache")
    assert cached["feature_cache"] is not None and live["feature_cache"] is None
    a = load_checkpoint(root / "cached" / "last.pt")["model"]
    b = load_checkpoint(root / "live" / "last.pt")["model"]
    for k in a:
        if k.startswith("head."):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for split in ("train", "val", "test"):
        assert cached[split]["acc"] == pytest.approx(live[split]["acc"], abs=1e-6)
        assert cached[split]["loss"] == pytest.approx(live[split]["loss"], rel=1e-4)


def test_second_run_hits_cache_and_changed_key_misses(setup, caplog):
    root, data, weights = setup
    first = _train(root, data, weights, "k1")
    second = _train(root, data, weights, "k2")
    assert all(second["feature_cache"][s]["hit"] for s in ("train", "val", "test"))
    assert first["feature_cache"]["train"]["key"] == second["feature_cache"]["train"]["key"]
    resized = _train(
        root, data, weights, "k3", "--image-size", "40"
    )  # a changed key never reuses features
    assert not resized["feature_cache"]["train"]["hit"]
    other = root / "other.pth"
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, other)
    changed = _train(root, data, other, "k4")
    assert not changed["feature_cache"]["train"]["hit"]


def test_corrupt_cache_file_is_deleted_and_rebuilt(setup, caplog):
    root, data, weights = setup
    first = _train(root, data, weights, "c1")
    path = fcache.entry_path(root / "cache", first["feature_cache"]["train"]["key"])
    raw = bytearray(path.read_bytes())
    raw[-10:] = b"\xff" * 10  # garble the data region: only the checksum can tell
    path.write_bytes(bytes(raw))
    second = _train(root, data, weights, "c2")
    assert not second["feature_cache"]["train"]["hit"]
    assert "corrupt" in caplog.text
    path.write_bytes(path.read_bytes()[:100])  # truncated
    third = _train(root, data, weights, "c3")
    assert not third["feature_cache"]["train"]["hit"]
    assert second["test"]["acc"] == third["test"]["acc"] == first["test"]["acc"]


def test_failed_cache_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        fcache.save_entry(tmp_path, "k", {"features": torch.ones(4, 3)}, {"split": "train"})
    assert list(tmp_path.iterdir()) == []
    assert fcache.load_entry(tmp_path, "k") is None


def test_concurrent_writers_of_one_key_leave_a_valid_entry(tmp_path):
    import threading

    tensors = {"features": torch.arange(12.0).reshape(4, 3), "labels": torch.arange(4)}
    threads = [
        threading.Thread(target=fcache.save_entry, args=(tmp_path, "k", tensors, {"i": i}))
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loaded, _ = fcache.load_entry(tmp_path, "k")
    assert torch.equal(loaded["features"], tensors["features"])
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]


def test_feature_views_and_lbfgs_probe(setup):
    root, data, weights = setup
    views = _train(root, data, weights, "views", "--feature-views", "3")
    f = fcache.load_entry(root / "cache", views["feature_cache"]["train"]["key"])[0]["features"]
    assert f.shape[:2] == (240, 3) and not torch.equal(
        f[:, 0], f[:, 1]
    )  # 3 distinct augmented views
    probe = _train(root, data, weights, "probe", "--head", "linear", "--solver", "lbfgs")
    assert probe["probe"]["l2"] in [t["l2"] for t in probe["probe"]["trials"]]
    assert probe["val"]["acc"] == pytest.approx(
        max(t["val_acc"] for t in probe["probe"]["trials"]), abs=1e-4
    )
    assert probe["test"]["acc"] > 0.3  # 10 separable synthetic classes: far above chance (0.1)


def test_cache_list_and_clear(setup, capsys):
    root, data, weights = setup
    _train(root, data, weights, "lc")
    assert main(["cache", "list", "--cache-dir", str(root / "cache")]) == 0
    assert "split=train" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(root / "cache")]) == 0
    assert not list((root / "cache").glob("*.safetensors"))


def test_best_is_a_hard_link_that_survives_the_next_last(tmp_path):
    from types import SimpleNamespace

    from transferlab.io import write_torch
    from transferlab.training.fit import link_best

    job = SimpleNamespace(env=SimpleNamespace(is_main=True), run_dir=tmp_path)
    write_torch(tmp_path / "last.pt", {"epoch": 1})
    link_best(job, state=None, opt=None)
    write_torch(tmp_path / "last.pt", {"epoch": 2})  # the next epoch replaces last.pt, not best.pt
    assert torch.load(tmp_path / "best.pt", weights_only=True) == {"epoch": 1}
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def _repaint_keeping_size_and_mtime(folder: Path) -> None:
    """Every image repainted (colours inverted): the same byte size (BMP), its mtime put back."""
    for f in sorted(folder.rglob("*.bmp")):
        st = f.stat()
        with Image.open(f) as im:
            ImageOps.invert(im.convert("RGB")).save(f)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_folder_cache_keys_on_content_a_repaint_misses(setup, tmp_path, monkeypatch):
    """Issue 24: the folder's old features were served after every image was repainted."""
    root, _, weights = setup
    folder = write_png_tree(tmp_path / "imgs", {"a": 8, "b": 8, "c": 8}, size=16)
    for png in folder.rglob("*.png"):  # BMP: a repaint keeps the byte size (the old key's blind
        Image.open(png).save(png.with_suffix(".bmp"))  # spot: paths and sizes only)
        png.unlink()
    cache = tmp_path / "cache"
    calls = []
    real = content.file_sha256
    monkeypatch.setattr(content, "file_sha256", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(content, "RACY_S", 0.0)  # the files were written a moment ago

    def run(name: str) -> dict:
        out = tmp_path / name
        args = ["train", "--data", f"folder:{folder}", "--model", "resnet18"]
        args += ["--weights", str(weights), "--image-size", "32", "--epochs", "1"]
        args += ["--device", "cpu", "--precision", "fp32", "--engine", "torch"]
        args += ["--cache-dir", str(cache), "--run-dir", str(out), "--no-progress", "--no-report"]
        assert main(args) == 0
        return json.loads((out / "summary.json").read_text())["feature_cache"]

    first = run("r1")
    hashed_first = len(calls)
    assert hashed_first == 24  # every file's bytes, once
    second = run("r2")
    assert all(second[s]["hit"] for s in ("train", "val", "test"))
    assert len(calls) == hashed_first  # unchanged files: the memo answered, no byte read
    _repaint_keeping_size_and_mtime(folder)
    third = run("r3")
    assert not any(third[s]["hit"] for s in ("train", "val", "test"))
    assert third["train"]["key"] != first["train"]["key"]
    assert (cache / fcache.DIGEST_MEMO).is_file()


def test_cache_list_and_clear_include_engines_and_memos(tmp_path, capsys):
    cache = tmp_path / "cache"
    fcache.save_entry(
        cache / "engines",
        "a" * 24,
        {"model": torch.zeros(4, dtype=torch.uint8)},
        {"engine": "openvino"},
    )
    (cache / fcache.ENGINE_MEMO).write_text("{}")
    (cache / "mine.txt").write_text("a user's file")
    assert main(["cache", "list", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "converted model (openvino)" in out and "engines.json" in out
    assert "not ours, left alone (1): mine.txt" in out
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == ["mine.txt"]
