"""Issue 16's before/after table: each rule's cases run as real command lines on tiny data.

Runs every case as a subprocess against the source tree given by ``--src`` (the current
checkout's ``src`` by default, or an older one unpacked with ``git archive``), and prints one
markdown row per case: exit code, the last stderr line, and what the case checks (files intact,
no traceback, ...). Run it twice, before and after, and put the columns side by side.

Usage:
    git archive 3297f02 src | tar -x -C /tmp/before
    python benchmarks/safety_table.py --src /tmp/before/src > /tmp/before.md
    python benchmarks/safety_table.py > /tmp/after.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TINY = [
    "--model",
    "cnn",
    "--epochs",
    "1",
    "--batch-size",
    "20",
    "--val-size",
    "20",
    "--device",
    "cpu",
    "--no-progress",
]


@dataclass
class Result:
    code: object  # int, or "timeout"
    err: str  # last stderr line
    check: str  # what the case verified


class Ctx:
    """A scratch folder with tiny CIFAR data and one finished run, for one source tree."""

    def __init__(self, src: Path, root: Path):
        self.src, self.root = src, root
        self.env = {
            **os.environ,
            "PYTHONPATH": str(src),
            "TRANSFERLAB_CACHE_DIR": str(root / "cache"),
        }
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(k, None)
        code = (
            "from transferlab.data.cifar import write_cifar_like; import sys; "
            "write_cifar_like(sys.argv[1], n_train=60, n_test=20, n_classes=4)"
        )
        subprocess.run([sys.executable, "-c", code, str(root / "data")], env=self.env, check=True)
        self.data = root / "data"
        r = self.run(["train", "--data-dir", str(self.data), "--run-dir", str(root / "run"), *TINY])
        assert r.returncode == 0, r.stderr[-2000:]
        self.n = 0

    def run(
        self,
        argv: list[str],
        timeout: float = 120,
        env: dict | None = None,
        cwd: Path | None = None,
    ):
        return subprocess.run(
            [sys.executable, "-m", "transferlab", *argv],
            env={**self.env, **(env or {})},
            cwd=cwd or self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def copy_run(self) -> Path:
        self.n += 1
        dst = self.root / f"copy{self.n}"
        shutil.copytree(self.root / "run", dst)
        return dst


def digest(folder: Path) -> str:
    """sha256 of a file, or of a folder's visible files (names and bytes)."""
    h = hashlib.sha256()
    if folder.is_file():
        return hashlib.sha256(folder.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    tb = " [TRACEBACK]" if "Traceback" in text else ""
    return ((lines[-1] if lines else "")[:140] + tb).replace("|", "/")


def outcome(proc, check: str) -> Result:
    return Result(proc.returncode, last_line(proc.stderr), check)


# ---------------------------------------------------------------------------------------------
# The cases, by rule


def overwrite_bad(ctx: Ctx, bad: list[str]) -> Result:
    run = ctx.copy_run()
    before = digest(run)
    p = ctx.run(
        ["train", "--data-dir", str(ctx.data), "--run-dir", str(run), *TINY, "--overwrite", *bad]
    )
    left = sorted(f.name for f in run.iterdir() if not f.name.startswith("."))
    return outcome(
        p, "old run intact" if digest(run) == before else f"old run DESTROYED (left: {left})"
    )


def export_onto(ctx: Ctx, name: str) -> Result:
    run = ctx.copy_run()
    p = ctx.run(["export", str(run), "--format", "onnx", "--output", str(run / name)])
    ok = (
        ctx.run(["predict", str(run), str(ctx.root / "img.png")]).returncode == 0
        if name == "best.pt"
        else None
    )
    intact = digest(run / "last.pt") == digest(ctx.root / "run" / "last.pt")
    note = f"last.pt {'intact' if intact else 'DESTROYED'}"
    if ok is not None:
        note += f", predict {'works' if ok else 'FAILS'}"
    return outcome(p, note)


def export_unwritable(ctx: Ctx) -> Result:
    return outcome(
        ctx.run(["export", str(ctx.copy_run()), "--format", "onnx", "--output", "/proc/x/m.onnx"]),
        "one line expected",
    )


def cache_clear(ctx: Ctx) -> Result:
    cache = ctx.root / "usercache"
    cache.mkdir()
    (cache / "my_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (cache / ".draft.tmp").write_text("mine")
    p = ctx.run(["cache", "clear", "--cache-dir", str(cache)])
    kept = sorted(f.name for f in cache.iterdir())
    return outcome(p, f"user files kept: {kept}; stdout: {p.stdout.strip().splitlines()[-1][:80]}")


def cache_tilde(ctx: Ctx) -> Result:
    return outcome(ctx.run(["cache", "list", "--cache-dir", "~nobody_zz/c"]), "one line expected")


def two_writers(ctx: Ctx) -> Result:
    run = ctx.root / "shared"
    args = ["train", "--data-dir", str(ctx.data), "--run-dir", str(run), *TINY]
    cmd = [sys.executable, "-m", "transferlab", *args[:-1], "--no-progress"]
    cmd[cmd.index("--epochs") + 1] = "3"
    procs = [
        subprocess.Popen(
            cmd + (["--seed", str(i)]),
            env=ctx.env,
            cwd=ctx.root,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        for i in range(2)
    ]
    outs = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    rows = (
        (run / "metrics.csv").read_text().strip().splitlines()[1:]
        if (run / "metrics.csv").exists()
        else []
    )
    codes = [c for c, _ in outs]
    err = next((last_line(e) for c, e in outs if c), "")
    return Result(codes, err, f"metrics.csv rows: {len(rows)} (one run of 3 epochs = 3)")


def default_names(ctx: Ctx) -> Result:
    cwd = ctx.root / "names"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "transferlab", "train", "--data-dir", str(ctx.data), *TINY]
    procs = [
        subprocess.Popen(
            cmd, env=ctx.env, cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        for _ in range(2)
    ]
    outs = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    dirs = sorted(p.name for p in (cwd / "runs").iterdir()) if (cwd / "runs").is_dir() else []
    return Result(
        [c for c, _ in outs],
        next((last_line(e) for c, e in outs if c), ""),
        f"run dirs: {len(dirs)} ({', '.join(dirs)})",
    )


def folder_empty(ctx: Ctx) -> Result:
    return outcome(ctx.run(["train", "--data", "folder:", *TINY]), "error expected")


def write_pngs(root: Path, classes: list[str], n: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            px = np.clip(rng.normal(40 + 50 * k, 20, (10, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / c / f"{i}.png")
    return root


def run_inside_data(ctx: Ctx) -> Result:
    data = write_pngs(ctx.root / "flowers", ["a", "b"])
    before = sorted(p.name for p in data.iterdir())
    p = ctx.run(
        [
            "train",
            "--data",
            f"folder:{data}",
            "--run-dir",
            str(data / "runs" / "x"),
            *TINY,
            "--num-workers",
            "0",
        ]
    )
    after = sorted(p.name for p in data.iterdir())
    return outcome(p, "data root untouched" if after == before else f"data root now holds {after}")


def broken_link(ctx: Ctx) -> Result:
    data = write_pngs(ctx.root / "linked", ["a", "b"])
    (data / "a" / "gone.png").symlink_to(ctx.root / "nowhere.png")
    run = ctx.root / "linkrun"
    p = ctx.run(
        ["train", "--data", f"folder:{data}", "--run-dir", str(run), *TINY, "--num-workers", "0"]
    )
    try:
        info = json.loads((run / "summary.json").read_text())["data"]["folder"]
        names = [Path(x).name for x in info["bad_image_paths"]]
        note = f"bad files counted: {info['bad_images']} ({names})"
    except (OSError, KeyError, ValueError):
        note = "no summary"
    return outcome(p, note)


def class_named_train(ctx: Ctx) -> Result:
    data = write_pngs(ctx.root / "cifarlike", ["apple", "train", "tulip"])
    run = ctx.root / "trainclass"
    p = ctx.run(
        ["train", "--data", f"folder:{data}", "--run-dir", str(run), *TINY, "--num-workers", "0"]
    )
    try:
        s = json.loads((run / "summary.json").read_text())
        note = f"layout {s['data']['folder']['layout']}, {s['data']['classes']} classes"
    except (OSError, KeyError, ValueError):
        note = "no summary"
    return outcome(p, note)


def sixteen_bit(ctx: Ctx) -> Result:
    from PIL import Image

    path = ctx.root / "g16.png"
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(path)  # mid grey in 16 bits
    code = (
        "import sys; from transferlab.data.folder import load_image; "
        "print(float(load_image(sys.argv[1], 8).float().mean()))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(path)], env=ctx.env, capture_output=True, text=True
    )
    return outcome(
        p, f"8-bit value of a mid-grey 16-bit PNG: {p.stdout.strip() or '-'} (right: 128)"
    )


def pixel_limit(ctx: Ctx) -> Result:
    from PIL import Image

    data = write_pngs(ctx.root / "bombs", ["a", "b"])
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(data / "a" / "big.png")
    run = ctx.root / "bombrun"
    p = ctx.run(
        [
            "train",
            "--data",
            f"folder:{data}",
            "--run-dir",
            str(run),
            *TINY,
            "--num-workers",
            "0",
            "--max-image-pixels",
            "1000",
        ]
    )
    warned = "DecompressionBomb" in p.stderr
    try:
        n = json.loads((run / "summary.json").read_text())["data"]["folder"]["bad_images"]
    except (OSError, KeyError, ValueError):
        n = "?"
    return outcome(p, f"skipped: {n}; raw PIL warning: {warned}")


def predict_fifo(ctx: Ctx) -> Result:
    fifo = ctx.root / "pipe.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    try:
        p = ctx.run(["predict", str(ctx.root / "run"), str(fifo)], timeout=30)
    except subprocess.TimeoutExpired:
        return Result("timeout", "", "HUNG reading the FIFO (killed after 30 s)")
    return outcome(p, "refused, not read")


def stop_flag(ctx: Ctx) -> Result:
    code = (
        "import os, signal; from transferlab.stopflag import StopFlag\n"
        "with StopFlag() as s:\n    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print(getattr(s, 'exit_code', 'no exit_code'))"
    )
    p = subprocess.run([sys.executable, "-c", code], env=ctx.env, capture_output=True, text=True)
    return outcome(p, f"flag exit code after SIGTERM: {p.stdout.strip()}")


def resume_finished(ctx: Ctx) -> Result:
    run = ctx.copy_run()
    before = digest(run)
    p = ctx.run(["train", "--resume", str(run)])
    return outcome(
        p,
        f"{'untouched' if digest(run) == before else 'FILES CHANGED'}; "
        f"stdout: {last_line(p.stdout)[:70]}",
    )


def resume_edited(ctx: Ctx) -> Result:
    run = ctx.root / "editme"
    args = ["train", "--data-dir", str(ctx.data), "--run-dir", str(run), *TINY]
    args[args.index("--epochs") + 1] = "2"
    ctx.run(args)
    (run / "summary.json").unlink(missing_ok=True)  # an interrupted run: not finished
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(cfg.replace("lr: 0.001", "lr: 0.1"))
    return outcome(ctx.run(["train", "--resume", str(run)]), "refusal naming optim.lr expected")


def resume_empty(ctx: Ctx) -> Result:
    return outcome(ctx.run(["train", "--resume", ""]), "error about the empty value expected")


def env_rank(ctx: Ctx) -> Result:
    return outcome(
        ctx.run(["train", *TINY], env={"RANK": "abc", "WORLD_SIZE": "2"}), "one line expected"
    )


def seed_overflow(ctx: Ctx) -> Result:
    return outcome(
        ctx.run(
            [
                "train",
                "--data-dir",
                str(ctx.data),
                "--run-dir",
                str(ctx.root / "seed"),
                *TINY,
                "--seed",
                str(2**64),
            ]
        ),
        "range error expected",
    )


def huge_image(ctx: Ctx) -> Result:
    try:
        p = ctx.run(
            [
                "train",
                "--data-dir",
                str(ctx.data),
                "--run-dir",
                str(ctx.root / "huge"),
                *TINY,
                "--model",
                "resnet18",
                "--weights",
                "none",
                "--image-size",
                "8192",
                "--batch-size",
                "20",
            ],
            timeout=90,
        )
    except subprocess.TimeoutExpired:
        return Result("timeout", "", "still running after 90 s")
    return outcome(p, "early range error expected")


def batch_too_big(ctx: Ctx) -> Result:
    return outcome(
        ctx.run(
            [
                "train",
                "--data-dir",
                str(ctx.data),
                "--run-dir",
                str(ctx.root / "bs"),
                *TINY,
                "--batch-size",
                str(10**9),
            ],
            timeout=90,
        ),
        "error before data or training",
    )


def runs_damaged(ctx: Ctx) -> Result:
    d = ctx.root / "damaged"
    for i, text in enumerate(["{", "[]", '{"model": 1, "epochs_run": "x"}']):
        (d / f"r{i}").mkdir(parents=True, exist_ok=True)
        (d / f"r{i}" / "summary.json").write_text(text)
    return outcome(ctx.run(["runs", str(d)]), "one line per damaged file expected")


def report_damaged(ctx: Ctx, name: str, text: str) -> Result:
    run = ctx.copy_run()
    (run / name).write_text(text)
    return outcome(ctx.run(["report", str(run)]), "one line expected")


def version(ctx: Ctx) -> Result:
    p = ctx.run(["--version"])
    return Result(p.returncode, last_line(p.stderr), f"stdout: {p.stdout.strip()}")


def timm_nomatch(ctx: Ctx) -> Result:
    p = ctx.run(["models", "--timm", "zz_nothing*"])
    return Result(
        p.returncode, last_line(p.stderr), f"stdout: {p.stdout.strip()[:80] or '(empty)'}"
    )


def no_tty_progress(ctx: Ctx) -> Result:
    """progress() over 60 slow batches (3 s) with stderr a file, as under a batch scheduler."""
    code = (
        "import logging, time, torch; logging.basicConfig(level=logging.INFO)\n"
        "from transferlab import progress as p\n"
        "class L(list):\n    num_samples = 120\n"
        "def slow():\n    for _ in range(60):\n        time.sleep(0.05)\n"
        "        yield torch.zeros(2), torch.zeros(2)\n"
        "src = L(); src.extend(slow())\n"
        "if hasattr(p, 'PLAIN_EVERY_S'): p.PLAIN_EVERY_S = 1.0\n"
        "def again():\n    for _ in range(60):\n        time.sleep(0.05)\n"
        "        yield torch.zeros(2), torch.zeros(2)\n"
        "class M:\n    num_samples = 120\n    def __iter__(self): return again()\n"
        "    def __len__(self): return 60\n"
        "for _ in p.progress(M(), 'epoch 1', True): pass\n"
    )
    with open(ctx.root / "progress.err", "w") as err:
        proc = subprocess.run([sys.executable, "-c", code], env=ctx.env, stderr=err, text=True)
    raw = (ctx.root / "progress.err").read_bytes()  # bytes: text mode would turn \r into \n
    cr, lf = raw.count(b"\r"), raw.count(b"\n")
    return Result(proc.returncode, "", f"carriage returns in the stderr file: {cr}, lines: {lf}")


def sigterm_train(ctx: Ctx) -> Result:
    args = ["train", "--data-dir", str(ctx.data), "--run-dir", str(ctx.root / "term"), *TINY]
    args[args.index("--epochs") + 1] = "200"
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferlab", *args],
        env=ctx.env,
        cwd=ctx.root,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (ctx.root / "term" / "last.pt").exists():
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    return Result(code, last_line(proc.stderr.read()), "exit code 143 expected (128 + SIGTERM)")


CASES: list[tuple[str, str, Callable[[Ctx], Result]]] = [
    (
        "1 validate before destroy",
        "--overwrite --data folder:/typo",
        lambda c: overwrite_bad(c, ["--data", "folder:/typo"]),
    ),
    (
        "1 validate before destroy",
        "--overwrite --model resnet181",
        lambda c: overwrite_bad(c, ["--model", "resnet181"]),
    ),
    (
        "1 validate before destroy",
        "export --output RUN/best.pt",
        lambda c: export_onto(c, "best.pt"),
    ),
    (
        "1 validate before destroy",
        "export --output RUN/summary.json",
        lambda c: export_onto(c, "summary.json"),
    ),
    ("1 validate before destroy", "export --output /proc/x/m.onnx", export_unwritable),
    ("2 delete only what you own", "cache clear with a user's .safetensors and .tmp", cache_clear),
    ("2 delete only what you own", "cache --cache-dir ~nobody/c", cache_tilde),
    ("3 one writer", "two train processes, one --run-dir", two_writers),
    ("3 one writer", "two default-named runs started together", default_names),
    ("4 data roots", "--data folder:", folder_empty),
    ("4 data roots", "--run-dir inside the folder data root", run_inside_data),
    ("4 data roots", "a broken symlink among the images", broken_link),
    ("4 data roots", "a class named train", class_named_train),
    ("5 decode", "16-bit grayscale PNG", sixteen_bit),
    ("5 decode", "--max-image-pixels 1000, an 80x60 image", pixel_limit),
    ("5 decode", "predict on a FIFO", predict_fifo),
    ("6 stop", "_StopFlag after SIGTERM", stop_flag),
    ("6 stop", "SIGTERM during training", sigterm_train),
    ("7 resume", "--resume a finished run", resume_finished),
    ("7 resume", "--resume after editing config.yaml", resume_edited),
    ("7 resume", '--resume ""', resume_empty),
    ("8 one line", "RANK=abc WORLD_SIZE=2", env_rank),
    ("8 one line", "--seed 2**64", seed_overflow),
    ("8 one line", "--image-size 8192 on resnet18", huge_image),
    ("8 one line", "--batch-size 10**9 on 40 images", batch_too_big),
    ("8 one line", "runs on damaged summary.json", runs_damaged),
    (
        "8 one line",
        "report on damaged summary.json",
        lambda c: report_damaged(c, "summary.json", "{"),
    ),
    (
        "8 one line",
        "report on damaged metrics.csv",
        lambda c: report_damaged(c, "metrics.csv", "epoch,train_loss\n1,x\n"),
    ),
    ("also", "--version", version),
    ("also", "models --timm with no match", timm_nomatch),
    ("also", "progress when stderr is a file", no_tty_progress),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"))
    ap.add_argument("--only", default="", help="run cases whose text contains this")
    args = ap.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        ctx = Ctx(Path(args.src), Path(tmp))
        Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(ctx.root / "img.png")
        print("| rule | case | exit | last stderr line | check |")
        print("|---|---|---|---|---|")
        for rule, case, fn in CASES:
            if args.only and args.only not in case:
                continue
            try:
                r = fn(ctx)
            except Exception as e:  # the harness, not the tool
                r = Result("harness", f"{type(e).__name__}: {e}"[:140], "")
            print(f"| {rule} | {case} | {r.code} | {r.err} | {r.check} |", flush=True)


if __name__ == "__main__":
    main()
