"""Fuzz whole command lines, in process, on tiny data (issue 16, rule 9).

Each example draws a subcommand, a random subset of its flags (read from the real parser, so
new flags are fuzzed too) with hostile or careless values (broken paths, ``~nobody``, FIFOs,
overflowing integers, NaN, empty strings, a damaged run), and random torchrun/transferlab
environment variables. It runs ``transferlab.cli.main`` and asserts:

* the exit code is 0, 1 or 2 (argparse's own exits included);
* stderr holds no traceback and no "internal error" (the CLI's line for a bug);
* no file outside the command's run dir, cache dir and explicit ``--output`` changed, and a
  user's own file in the cache dir survives ``cache clear``.

The default run is small (``FUZZ_EXAMPLES``, about 30-60 s on a 2-core CPU); the ``slow``
marker runs many more. Every command line and its outcome is appended to
``$FUZZ_LOG`` (if set), one JSON object per line, for the report.

Kept out of the fuzzed flags, with the reason: ``--download`` (network), ``--compile`` (a
minute of compilation per example), ``--epochs``/``--max-epochs`` and ``--num-workers`` are
pinned last (a valid 10**6 epochs or 10**6 workers is slow, not wrong).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
SLOW_EXAMPLES = 300
SKIP_FLAGS = {
    "--download",
    "--compile",
    "--epochs",
    "--max-epochs",
    "--num-workers",
    "-h",
    "--help",
    "--version",
    "--resume",
}
PINNED = ["--epochs", "1", "--num-workers", "0"]  # appended last to train: argparse keeps the last
BASE_TRAIN = [
    "--model",
    "cnn",
    "--batch-size",
    "20",
    "--val-size",
    "20",
    "--no-progress",
    "--no-report",
    "--device",
    "cpu",
]
ENV_NAMES = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_PORT",
    "MASTER_ADDR",
    "TRANSFERLAB_CACHE_DIR",
    "TRANSFERLAB_DIST_TIMEOUT",
]
CHANGING = (
    "fuzzruns",
    "runs",
    "mlruns",
    "cache",
    "copies",
    "outputs",
)  # may change: run/cache/outputs

INTS = st.sampled_from([0, 1, 2, 3, 7, 20, -1, -7, 2**31, 2**32, 2**63, 10**30])
FLOATS = st.sampled_from(
    ["0", "1e-3", "0.5", "1", "-1", "nan", "inf", "-inf", "1e308", "1e-320", "abc"]
)


class Workspace:
    """Tiny data, a finished run, a damaged runs tree, user files: all a command may touch."""

    def __init__(self, root: Path):
        from transferlab.cli import main
        from transferlab.data.cifar import write_cifar_like
        from transferlab.features import cache as fcache

        self.root = root
        self.data = write_cifar_like(root / "data", n_train=60, n_test=20, n_classes=4)
        self.folder = root / "pngs"
        rng = np.random.default_rng(0)
        for k, cls in enumerate(("red", "blue")):
            (self.folder / cls).mkdir(parents=True)
            for i in range(8):
                px = np.clip(rng.normal(60 + 120 * k, 20, (10, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(self.folder / cls / f"{i}.png")
        self.run = root / "run"
        assert (
            main(
                [
                    "train",
                    "--data-dir",
                    str(self.data),
                    "--run-dir",
                    str(self.run),
                    *BASE_TRAIN,
                    "--epochs",
                    "1",
                ]
            )
            == 0
        )
        self.cache = root / "cache"
        self.cache.mkdir()
        self.user_cache_file = self.cache / "my_model.safetensors"
        self.user_cache_file.write_bytes(b"a user's own model, not ours")
        fcache.save_entry(
            self.cache, "f" * 24, {"features": __import__("torch").ones(2, 2)}, {"split": "x"}
        )
        self.user_file = root / "user.onnx"
        self.user_file.write_bytes(b"the user's model")
        self.fifo = root / "pipe.png"
        os.mkfifo(self.fifo)
        self.image = self.folder / "red" / "0.png"
        self.text = root / "notes.txt"
        self.text.write_text("not an image")
        self.broken_yaml = root / "broken.yaml"
        self.broken_yaml.write_text("data: [1, 2\n")
        self.list_yaml = root / "lists.yaml"
        self.list_yaml.write_text("data: [1, 2]\noptim:\n  - lr\n")
        self.dangling = root / "dangling.png"
        self.dangling.symlink_to(root / "gone.png")
        damaged = root / "damaged"
        for i, text in enumerate(
            ["{", "[]", '{"model": 1, "test": [], "time_s": {"total": "x"}}', "\0\0"]
        ):
            (damaged / f"r{i}").mkdir(parents=True)
            (damaged / f"r{i}" / "summary.json").write_text(text)
        self.damaged = damaged
        self.count = 0
        self.findings: list[dict] = []

    def copy_run(self) -> Path:
        """A private copy of the finished run (commands may legitimately change their run)."""
        self.count += 1
        dst = self.root / "copies" / f"run{self.count}"
        shutil.copytree(self.run, dst, symlinks=True)
        return dst

    def fresh(self) -> str:
        self.count += 1
        return str(self.root / "fuzzruns" / f"r{self.count}")

    def snapshot(self) -> dict[str, tuple[int, int]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root)
            if rel.parts and rel.parts[0] in CHANGING:
                if rel.parts[0] == "cache":
                    continue
                dirnames[:] = []
                continue
            for name in filenames:
                p = Path(dirpath) / name
                st_ = p.lstat()
                out[str(p.relative_to(self.root))] = (st_.st_size, st_.st_mtime_ns)
        return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("fuzz"))


def _strings(ws: Workspace, d) -> st.SearchStrategy:
    return st.sampled_from(
        [
            "",
            " ",
            "-",
            "--",
            "cnn",
            "cpu",
            "auto",
            "cuda:7",
            "none",
            "imagenet",
            "mlflow",
            "frozen",
            "sgd",
            "skip",
            "folder:",
            "folder:/no/such/dir",
            f"folder:{ws.folder}",
            "folder:~nobody_zz/x",
            "cifar100",
            "resnet181",
            "timm:no_such_net",
            "/no/such/file",
            "~nobody_zz/x",
            "/dev/null",
            "/proc/self/mem",
            str(ws.user_file),
            str(ws.text),
            str(ws.fifo),
            str(ws.broken_yaml),
            str(ws.list_yaml),
            str(ws.data),
            str(ws.run / "best.pt"),
            str(ws.dangling),
            "x" * 300,
            "ünïcödé",
            "a\nb",
            "cnn-best",
            "1e999",
            "-1",
        ]
    )


def _value(d, action, ws: Workspace):
    if action.choices is not None and d.draw(st.booleans()):
        return str(d.draw(st.sampled_from(sorted(map(str, action.choices)))))
    if action.type is int:
        return str(d.draw(INTS))
    if action.type is float:
        return d.draw(FLOATS)
    if action.dest.endswith("run_dir") or action.dest == "run_dir":
        return d.draw(
            st.sampled_from([ws.fresh(), str(ws.copy_run()), "", str(ws.data), str(ws.root)])
        )
    return d.draw(_strings(ws, d))


def _subparser(name: str):
    from transferlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name]


def _optional_flags(d, name: str, ws: Workspace) -> list[str]:
    actions = [
        a
        for a in _subparser(name)._actions
        if a.option_strings and not set(a.option_strings) & SKIP_FLAGS
    ]
    chosen = d.draw(st.lists(st.sampled_from(actions), max_size=4, unique_by=id))
    argv: list[str] = []
    for a in chosen:
        argv.append(d.draw(st.sampled_from(a.option_strings)))
        if a.nargs != 0:
            argv.append(_value(d, a, ws))
    return argv


def _command(d, ws: Workspace) -> tuple[list[str], list[str]]:
    """(argv, explicit output paths the command may create)."""
    name = d.draw(
        st.sampled_from(
            [
                "train",
                "train",
                "train",
                "resume",
                "cache",
                "models",
                "runs",
                "report",
                "export",
                "predict",
                "garbage",
            ]
        )
    )
    outputs: list[str] = []
    if name == "garbage":
        return d.draw(st.lists(_strings(ws, d), max_size=3)), outputs
    if name == "resume":
        target = d.draw(
            st.sampled_from([str(ws.copy_run()), "", "/no/such/run", ws.fresh(), str(ws.data)])
        )
        extra = d.draw(
            st.sampled_from([[], ["--device", "cpu"], ["--epochs", "2"], ["--lr", "nan"]])
        )
        return ["train", "--resume", target, *extra], outputs
    if name == "train":
        return [
            "train",
            "--data-dir",
            str(ws.data),
            "--run-dir",
            ws.fresh(),
            *BASE_TRAIN,
            *_optional_flags(d, "train", ws),
            *PINNED,
        ], outputs
    if name == "cache":
        action = d.draw(st.sampled_from(["list", "clear", "purge"]))
        where = d.draw(
            st.sampled_from([str(ws.cache), "~nobody_zz/c", str(ws.user_file), "/no/such", ""])
        )
        return ["cache", action, "--cache-dir", where], outputs
    if name == "models":
        return [
            "models",
            *d.draw(st.sampled_from([[], ["--timm", "zz_no_match*"], ["--timm", ""]])),
        ], outputs
    if name == "runs":
        return [
            "runs",
            d.draw(st.sampled_from([str(ws.damaged), "/no/such", str(ws.user_file)])),
        ], outputs
    run = str(ws.copy_run())
    if name == "report":
        _damage(d, Path(run))
        return [
            "report",
            d.draw(st.sampled_from([run, str(ws.damaged / "r0"), "/no/such"])),
        ], outputs
    if name == "export":
        fmt = d.draw(st.sampled_from(["onnx", "torchscript", "openvino", "png"]))
        out = d.draw(
            st.sampled_from(
                [
                    "",
                    f"{run}/best.pt",
                    f"{run}/summary.json",
                    str(ws.user_file),
                    str(ws.root / "outputs" / "m.onnx"),
                    "/proc/x.onnx",
                    "/no/such/dir/m.onnx",
                    str(ws.data),
                ]
            )
        )
        argv = ["export", run, "--format", fmt, *(["--output", out] if out else [])]
        if d.draw(st.booleans()):
            argv.append("--force")
        if out.startswith(str(ws.root / "outputs")) or ("--force" in argv and out):
            outputs += [out, out + ".json"]
        return argv, outputs
    images = d.draw(
        st.lists(
            st.sampled_from(
                [
                    str(ws.image),
                    str(ws.fifo),
                    "/dev/zero",
                    "/no/such.png",
                    str(ws.folder),
                    str(ws.text),
                    str(ws.dangling),
                ]
            ),
            min_size=1,
            max_size=3,
        )
    )
    return ["predict", run, *images, *_optional_flags(d, "predict", ws)], outputs


def _damage(d, run: Path) -> None:
    if not d.draw(st.booleans()):
        return
    name = d.draw(
        st.sampled_from(["summary.json", "metrics.csv", "config.yaml", "test_predictions.npz"])
    )
    data = d.draw(
        st.sampled_from(
            [b"", b"{", b"\0\0\0", b"epoch,train_loss\n1,abc\n", b"[1, 2]", b"\xff\xfe"]
        )
    )
    (run / name).write_bytes(data)


def _env(d) -> dict[str, str]:
    if d.draw(st.integers(0, 3)):  # three in four command lines run in a clean environment
        return {}
    names = d.draw(st.lists(st.sampled_from(ENV_NAMES), min_size=1, max_size=2, unique=True))
    values = st.sampled_from(
        ["", "0", "1", "2", "-1", "abc", "99999", "1e3", "~nobody_zz/c", "/no/such"]
    )
    return {n: d.draw(values) for n in names if not (n == "MASTER_ADDR")} | (
        {"MASTER_ADDR": ""} if "MASTER_ADDR" in names else {}
    )


def run_one(ws: Workspace, d, capsys, caplog, monkeypatch) -> dict:
    """Draw one command line, run it, check the rules; returns its record."""
    from transferlab.cli import main

    argv, outputs = _command(d, ws)
    env = _env(d)
    for k in ENV_NAMES + ["TRANSFERLAB_DEBUG"]:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ws.root)  # default run dirs (runs/...) and ./mlruns land in the workspace
    before = ws.snapshot()
    capsys.readouterr()
    caplog.clear()
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        code = e.code if isinstance(e.code, int) else 2
    finally:
        for k in env:
            monkeypatch.delenv(k, raising=False)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    after = ws.snapshot()
    changed = sorted(
        k
        for k in set(before) | set(after)
        if before.get(k) != after.get(k) and str(ws.root / k) not in outputs
    )
    last = (err.strip().splitlines() or [""])[-1]
    record = {
        "argv": argv,
        "env": env,
        "code": code,
        "seconds": round(seconds, 2),
        "stderr": last[:300],
        "changed": changed,
    }
    problems = [
        why
        for why, bad in (
            ("exit code", code not in (0, 1, 2)),
            ("traceback", "Traceback" in err or "Traceback" in caplog.text),
            ("internal error", "internal error" in err),
            ("changed files outside the run", bool(changed)),
            (
                "user's cache file",
                ws.user_cache_file.read_bytes() != b"a user's own model, not ours",
            ),
        )
        if bad
    ]
    record["problems"] = problems
    log_path = os.environ.get("FUZZ_LOG")
    if log_path:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    if os.environ.get("FUZZ_COLLECT"):  # FUZZ_COLLECT=1: log every finding, fail none (for reports)
        return record
    assert not problems, record
    return record


# no shrinking: an example can train for seconds; the failing record names the command line
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


@settings(max_examples=FUZZ_EXAMPLES, **SETTINGS)
@given(d=st.data())
def test_fuzz_command_lines(ws, d, capsys, caplog, monkeypatch):
    run_one(ws, d, capsys, caplog, monkeypatch)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **{**SETTINGS, "derandomize": False})
@given(d=st.data())
def test_fuzz_command_lines_many(ws, d, capsys, caplog, monkeypatch):
    run_one(ws, d, capsys, caplog, monkeypatch)
