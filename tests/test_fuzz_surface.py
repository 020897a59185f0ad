"""Fuzz the newer surface (issue 24 item 6): ``study``, ``rank``, ``explain``, ``cache``,
``check-data``, ``report`` on damaged study dirs, and the Python API (keyword fuzzing through
``tl.train``, ``tl.load_run``, ``Run.predict``), in process, on tiny data.

Each example draws one command line (or one API call) with hostile or careless values and
asserts, as tests/test_fuzz_cli.py does for the older commands:

* the exit code is 0, 1 or 2 (the API: it returns, or raises ``UserError``/``TrainingStopped``);
* stderr and the log hold no traceback and no "internal error" line;
* no file outside the command's own run or study dir (and the cache dir) changed, and a user's
  own files (in the cache dir, beside the data, in a folder passed as ``--run-dir``) survive.

The default run is small (``FUZZ_SURFACE_EXAMPLES``, 20); the ``slow`` marker runs 200. Every
command line is appended to ``$FUZZ_LOG`` (if set), one JSON object per line, for the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

import transferlab as tl
from conftest import write_png_tree
from transferlab.cli import main
from transferlab.data.cifar import write_cifar_like
from transferlab.errors import TrainingStopped
from transferlab.features import cache as fcache
from transferlab.rundir import StudyDir

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_SURFACE_EXAMPLES", "20"))  # slow: 200, random
SLOW_EXAMPLES = int(os.environ.get("FUZZ_SURFACE_SLOW", "200"))
TINY = ["--epochs", "1", "--batch-size", "16", "--val-size", "10", "--device", "cpu"]
TINY += ["--no-progress", "--no-report", "--num-workers", "0"]
CHANGING = ("fresh", "copies", "cache", "outputs", "runs", "mlruns")  # a command's own places

ARMS = [
    "cnn:scratch",
    "cnn:scratch:",
    "cnn:scratch,cnn:scratch:",
    "cnn:fast",
    "cnn",
    "",
    ":",
    "cnn:frozen",
    "resnet18:frozen",
    "timm:no_such_net:frozen",
    "cnn:scratch:no-such-preset",
    "cnn:scratch:tune0",
    "cnn:scratch:/no/such.yaml",
]
CANDIDATES = ["resnet18@0", "resnet18@-5", "resnet18@2000", "resnet18@", "@", "cnn", "", ","]
CANDIDATES += ["resnet18@nan", "timm:no_such_net", "resnet18@16,resnet18@16"]
SIZES = ["2", "0", "-1", "0.5", "1.5", "all", "", "abc", "2,2", "10**9", "1e9"]
VALUES = ["", "-1", "0", "nan", "inf", "abc", "10**30", "~nobody_zz/x", "/no/such", "a\nb"]
API_VALUES = [None, "", -1, 0, math.nan, math.inf, 10**30, "abc", [], {}, ["a"], 1.5, True]
API_KEYS = ["epochs", "lr", "per_class", "batch_size", "image_size", "val_size", "seed", "model"]
API_KEYS += ["mode", "head", "optimizer", "precision", "engine", "data", "cache_dir", "weights"]
API_KEYS += ["label_smoothing", "grad_clip", "threads", "folds", "balance", "no_such_option"]


class Workspace:
    """Tiny data, a finished run, damaged studies, user files: everything a command may touch."""

    def __init__(self, root: Path):
        self.root = root
        self.data = write_cifar_like(root / "data", n_train=60, n_test=20, n_classes=4)
        self.folder = write_png_tree(root / "pngs", {"red": 6, "blue": 6}, size=12)
        self.run = root / "run"
        argv = ["train", "--data-dir", str(self.data), "--run-dir", str(self.run), "--model"]
        assert main([*argv, "cnn", *TINY]) == 0
        self.cache = root / "cache"
        (self.cache / "engines").mkdir(parents=True)
        self.user_cache_file = self.cache / "my_model.safetensors"
        self.user_cache_file.write_bytes(b"a user's own model")
        fcache.save_entry(self.cache, "f" * 24, {"features": torch.ones(2, 2)}, {"split": "x"})
        fcache.save_entry(
            self.cache / "engines", "e" * 24, {"model": torch.zeros(3, dtype=torch.uint8)}, {}
        )
        (self.cache / fcache.ENGINE_MEMO).write_text("{}")
        self.home = root / "home"  # a user's folder: config.yaml, .git, notes (not a run)
        (self.home / ".git").mkdir(parents=True)
        (self.home / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (self.home / "config.yaml").write_text("mine: true\n")
        (self.home / "notes.txt").write_text("years of work")
        self.user_file = root / "user.png"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(self.user_file)
        self.text = root / "notes.txt"
        self.text.write_text("not an image")
        self.damaged = root / "damaged_studies"
        for i, text in enumerate(["", "{", "[]", '{"grid": 3}', '{"grid": {"arms": 1}}']):
            d = self.damaged / f"s{i}"
            d.mkdir(parents=True)
            StudyDir(d).write_marker()
            StudyDir(d).study.write_text(text)
            StudyDir(d).cells.write_text(text)
            StudyDir(d).costs.write_text(text)
        self.count = 0

    def fresh(self) -> str:
        self.count += 1
        return str(self.root / "fresh" / f"d{self.count}")

    def copy(self, src: Path) -> str:
        self.count += 1
        dst = self.root / "copies" / f"c{self.count}"
        shutil.copytree(src, dst, symlinks=True)
        return str(dst)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            if rel.parts and rel.parts[0] in CHANGING:
                dirnames[:] = []
                continue
            for name in filenames:
                st_ = (Path(dirpath) / name).lstat()
                out[str(rel / name)] = (st_.st_size, st_.st_mtime_ns)
        return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("fuzz_surface"))


def _dir(d, ws: Workspace) -> str:
    return d.draw(
        st.sampled_from(
            [ws.fresh(), ws.fresh(), str(ws.home), str(ws.data), str(ws.folder / "runs"), ""]
        )
    )


def _command(d, ws: Workspace) -> list[str]:
    name = d.draw(
        st.sampled_from(["study", "study", "rank", "explain", "cache", "check-data", "report"])
    )
    if name == "study":
        argv = ["study", "--arms", d.draw(st.sampled_from(ARMS)), "--run-dir", _dir(d, ws)]
        argv += ["--per-class", d.draw(st.sampled_from(SIZES)), "--min-steps", "2"]
        data = d.draw(st.sampled_from(["cifar", "folder", "folder-missing"]))
        argv += (
            ["--data-dir", str(ws.data)]
            if data == "cifar"
            else ["--data", f"folder:{ws.folder if data == 'folder' else '/no/such'}"]
        )
        extra = d.draw(st.sampled_from([[], ["--overwrite"], ["--plan"], ["--seeds", "0"]]))
        flag = d.draw(st.sampled_from(["--lr", "--image-size", "--val-size", "--seeds", "--folds"]))
        return [
            *argv,
            *TINY,
            *extra,
            *([flag, d.draw(st.sampled_from(VALUES))] * d.draw(st.booleans())),
        ]
    if name == "rank":
        argv = ["rank", "--candidates", d.draw(st.sampled_from(CANDIDATES))]
        argv += ["--data-dir", str(ws.data), "--val-size", "10", "--weights", "none"]
        argv += ["--device", "cpu", "--no-progress", "--cache-dir", str(ws.cache)]
        if d.draw(st.booleans()):
            argv += ["--per-class", d.draw(st.sampled_from(["2", "0", "-3", "abc", "500"]))]
        return argv
    if name == "explain":
        run = d.draw(st.sampled_from([ws.copy(ws.run), "/no/such", str(ws.home), ""]))
        images = d.draw(
            st.lists(
                st.sampled_from(
                    [str(ws.folder / "red" / "000.png"), str(ws.text), "/dev/zero", "/no/x.png"]
                ),
                min_size=1,
                max_size=2,
            )
        )
        out = d.draw(
            st.sampled_from(
                ["", str(ws.root / "outputs" / f"e{ws.count}"), str(ws.home), str(ws.folder)]
            )
        )
        return ["explain", run, *images, *(["--out", out] if out else []), "--device", "cpu"]
    if name == "cache":
        where = d.draw(st.sampled_from([str(ws.cache), str(ws.user_file), "/no/such", ""]))
        return ["cache", d.draw(st.sampled_from(["list", "clear"])), "--cache-dir", where]
    if name == "check-data":
        target = d.draw(
            st.sampled_from([str(ws.folder), "/no/such", str(ws.user_file), str(ws.data), ""])
        )
        return ["check-data", target]
    target = d.draw(st.sampled_from(sorted(str(p) for p in ws.damaged.iterdir())))
    return ["report", ws.copy(Path(target))]


def _check(ws: Workspace, record: dict, err: str, log_text: str, before: dict) -> None:
    after = ws.snapshot()
    out = (
        record.get("argv", [])[record["argv"].index("--out") + 1]
        if "--out" in record.get("argv", [])
        else ""
    )
    new_output = lambda k: out and str(ws.root / k).startswith(out + "/") and k not in before  # noqa: E731
    record["changed"] = sorted(
        k for k in set(before) | set(after) if before.get(k) != after.get(k) and not new_output(k)
    )  # an explicit --out may gain new files; nothing that was there may change
    problems = [
        why
        for why, bad in (
            ("exit code", record.get("code") not in (0, 1, 2, None)),
            ("traceback", "Traceback" in err or "Traceback" in log_text),
            ("internal error", "internal error" in err or "internal error" in log_text),
            ("changed files outside the run", bool(record["changed"])),
            ("user's cache file", ws.user_cache_file.read_bytes() != b"a user's own model"),
        )
        if bad
    ]
    record["problems"] = problems
    if os.environ.get("FUZZ_LOG"):
        with open(os.environ["FUZZ_LOG"], "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
    assert not problems, record


def _api_call(d, ws: Workspace) -> tuple[str, object]:
    """One API call; returns (what, outcome): 'ok', a UserError/TrainingStopped, never another."""
    kind = d.draw(st.sampled_from(["train", "train", "load_run", "predict"]))
    if kind == "train":
        keys = d.draw(st.lists(st.sampled_from(API_KEYS), min_size=1, max_size=3, unique=True))
        kwargs = {k: d.draw(st.sampled_from(API_VALUES)) for k in keys}
        base = dict(data_dir=str(ws.data), run_dir=ws.fresh(), model="cnn", epochs=1)
        base |= dict(batch_size=16, val_size=10, device="cpu", progress=False, engine="torch")
        base |= dict(precision="fp32")
        what = f"tl.train({kwargs})"
        # None means "the default": a default epoch budget or batch is slow, not wrong
        pinned = {k: v for k, v in kwargs.items() if not (v is None and k in base)}
        call = lambda: tl.train(**{**base, **pinned})  # noqa: E731
    elif kind == "load_run":
        arg = d.draw(st.sampled_from([None, 42, "", "/no/such", str(ws.home), ws.copy(ws.run)]))
        what, call = f"tl.load_run({arg!r})", lambda: tl.load_run(arg)
    else:
        x = d.draw(
            st.sampled_from(
                [
                    torch.full((3, 8, 8), math.nan),
                    torch.zeros(2, 2),
                    torch.zeros(3, 8, 8, dtype=torch.int64),
                    str(ws.text),
                    [],
                    "/no/such.png",
                ]
            )
        )
        what = f"Run.predict({type(x).__name__})"
        call = lambda: tl.load_run(ws.run).predict(x, device="cpu")  # noqa: E731
    try:
        call()
        return what, "ok"
    except (tl.UserError, TrainingStopped) as e:
        return what, f"{type(e).__name__}: {str(e)[:200]}"


SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


def run_one(ws: Workspace, d, capsys, caplog, monkeypatch) -> None:
    monkeypatch.chdir(ws.root)
    monkeypatch.setenv(fcache.ENV_VAR, str(ws.cache))
    before = ws.snapshot()
    capsys.readouterr()
    caplog.clear()
    t0 = time.perf_counter()
    if d.draw(st.integers(0, 3)) == 0:  # one in four: the Python API
        what, outcome = _api_call(d, ws)
        record = {"api": what, "outcome": outcome, "code": None}
    else:
        argv = _command(d, ws)
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: a usage error (2)
            code = e.code if isinstance(e.code, int) else 2
        record = {"argv": argv, "code": code}
    record["seconds"] = round(time.perf_counter() - t0, 2)
    err = capsys.readouterr().err
    record["stderr"] = (err.strip().splitlines() or [""])[-1][:300]
    _check(ws, record, err, caplog.text, before)


@settings(max_examples=FUZZ_EXAMPLES, **SETTINGS)
@given(d=st.data())
def test_fuzz_the_new_surface(ws, d, capsys, caplog, monkeypatch):
    with caplog.at_level(logging.WARNING):
        run_one(ws, d, capsys, caplog, monkeypatch)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **{**SETTINGS, "derandomize": False})
@given(d=st.data())
def test_fuzz_the_new_surface_many(ws, d, capsys, caplog, monkeypatch):
    with caplog.at_level(logging.WARNING):
        run_one(ws, d, capsys, caplog, monkeypatch)
