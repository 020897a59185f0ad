"""DDP on the CPU (gloo): two processes match one, resume, count eval samples once, fail cleanly.

Two processes are spawned once (torch.multiprocessing, torchrun's variables set by hand) and run
every scenario in a row, so the ~7 s import cost is paid once; the single-process references
run in the pytest process. A torchrun subprocess checks that one rank's failure ends the job.

Equivalence holds because the global batch is the same set of samples in both cases: rank r
takes positions r::W of one permutation, so its batch b is positions b*B + r, b*B + r + W, ...
of the single-process batch b (B global, W ranks), and DDP averages the ranks' mean gradients.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.multiprocessing as mp

from transferlab.cli import build_parser, config_from_args
from transferlab.data.cifar import write_cifar_like
from transferlab.data.tensor_loader import TensorLoader
from transferlab.distributed import DistEnv, cleanup, init_distributed, run_checked
from transferlab.errors import TrainingStopped, UserError
from transferlab.experiment import run_experiment
from transferlab.features.engines import EngineChoice, TorchEngine
from transferlab.features.extract import extract_with_engine
from transferlab.rundir import RunDir
from transferlab.training.checkpoint import load_checkpoint
from transferlab.training.loop import StepContext, evaluate

WORLD = 2
N_TRAIN, N_TEST, VAL = (
    100,
    31,
    22,
)  # 78 train: a short last global batch (18), split 9 + 9; odd test set


def _cfg(tmp: Path, name: str, *extra: str):
    args = [
        "train",
        "--data-dir",
        str(tmp / "data"),
        "--val-size",
        str(VAL),
        "--no-progress",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--batch-size",
        "20",
        "--eval-batch-size",
        "16",
        "--epochs",
        "2",
        "--run-dir",
        str(tmp / name),
        "--cache-dir",
        str(tmp / f"cache-{name}"),
        # one engine for every run: each cache dir's own timed probe could pick another one
        # (and so another cache key and slightly other features) than the reference's
        "--engine",
        "torch",
        # no report.md/html (Grad-CAM, image grids): rank 0's report is not DDP's claim, and the
        # run files checked below (curves.png included) are written without it
        "--no-report",
        *extra,
    ]
    return config_from_args(build_parser().parse_args(args))


# Frozen random resnet18 at 32 px with the seed's head, trained on cached features (the fast path).
HEAD = ("--model", "resnet18", "--weights", "none", "--mode", "frozen", "--image-size", "32")
# Partial mode: a tiny EfficientNet's last stage and head on cached cut activations. Its BatchNorm
# keeps running statistics here (--partial-bn frozen), so one process and two see the same
# normalisation; under the default (batch statistics) each rank normalises its own half-batch,
# as DDP does without SyncBatchNorm (GPU-only), and the two runs differ by design.
PARTIAL = (
    "--model",
    "timm:test_efficientnet",
    "--weights",
    "none",
    "--mode",
    "partial",
    "--partial-bn",
    "frozen",
    "--image-size",
    "32",
    "--no-channels-last",
)


def _gradual(tmp: Path) -> tuple[str, ...]:
    """Pixels through a tiny ConvNeXt, gradual unfreezing: DDP must be rebuilt at the unfreeze.

    ConvNeXt normalises with LayerNorm, so one process and two see the same statistics
    (SyncBatchNorm, which would do the same for BatchNorm nets, is GPU-only). NCHW: oneDNN's
    channels_last convs sum a batch of 10 and one of 20 in different orders, and Adam turns that
    float noise into weight differences of ~2e-5, above this test's tolerance for DDP's math.
    """
    return (
        "--model",
        "timm:convnext_atto",
        "--weights",
        str(tmp / "atto.pth"),
        "--mode",
        "gradual",
        "--freeze-epochs",
        "1",
        "--image-size",
        "32",
        "--lr",
        "3e-3",
        "--no-channels-last",
    )


class _StopAt:
    """A stop request (as from SIGTERM) seen by one rank only, before optimiser step ``step``."""

    def __init__(self, step: int):
        self.calls, self.step = 0, step

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.step


def _scenarios(env: DistEnv, tmp: Path) -> dict:
    out = {}
    out["head"] = run_experiment(_cfg(tmp, "ddp-head", *HEAD), env=env).to_dict()
    out["gradual"] = run_experiment(_cfg(tmp, "ddp-gradual", *_gradual(tmp)), env=env).to_dict()
    out["partial"] = run_experiment(_cfg(tmp, "ddp-partial", *PARTIAL), env=env).to_dict()
    # Resume: rank 0 alone asks to stop mid-epoch 1 (step 3 of 4); both ranks must stop there.
    stop = _StopAt(2) if env.is_main else (lambda: False)
    cfg = _cfg(tmp, "ddp-resume", *HEAD, "--ckpt-every-steps", "1")
    cfg.run.cache_dir = str(tmp / "cache-ddp-head")  # reuse the first scenario's cache: a hit
    try:
        run_experiment(cfg, env=env, stop_requested=stop)
        out["stopped"] = None
    except TrainingStopped as e:
        out["stopped"] = e.exit_code
    out["resumed"] = run_experiment(_cfg(tmp, "ddp-resume"), resume=True, env=env).to_dict()
    out.update(_unit_checks(env))
    return out


def _unit_checks(env: DistEnv) -> dict:
    out = {}
    # Evaluation: 7 samples over 2 ranks (4 + 3): each counted once, none padded.
    n, classes = 7, 3
    y = torch.arange(n) % classes
    logits = torch.nn.functional.one_hot(
        torch.tensor([0, 1, 0, 0, 1, 1, 0]), classes
    ).float()  # 5 of 7 right
    ctx = StepContext(device=env.device, precision="fp32", env=env, progress=False)
    loader = TensorLoader(
        logits, y, batch_size=2, shuffle=False, rank=env.rank, world_size=env.world_size
    )
    res = evaluate(lambda f: f, loader, ctx)
    out["eval"] = (res.loss, res.acc)
    # Extraction: shards r::W reassembled in sample order.
    feats = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    loader = TensorLoader(
        feats, y, batch_size=2, shuffle=False, rank=env.rank, world_size=env.world_size
    )
    engine = TorchEngine(lambda f: f, EngineChoice("torch", "fp32", 32), env.device)
    out["extract"] = extract_with_engine(engine, lambda f: f, loader, env, n, progress=False)[0]

    # A user error on one rank only ends every rank with that message (instead of a hang).
    def fail_on_rank_1():
        if env.rank == 1:
            raise UserError("data file not found on this node")

    try:
        run_checked(fail_on_rank_1, env)
        out["shared_error"] = None
    except UserError as e:
        out["shared_error"] = str(e)
    return out


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    env = init_distributed("cpu", timeout_s=90)  # a deadlock fails the test instead of hanging it
    try:
        torch.save(_scenarios(env, Path(tmp)), Path(tmp) / f"rank{rank}.pt")
    finally:
        cleanup(env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process references (in this process), then the 2-process scenarios (spawned)."""
    tmp = tmp_path_factory.mktemp("ddp")
    write_cifar_like(tmp / "data", N_TRAIN, N_TEST)
    torch.manual_seed(0)
    torch.save(
        timm.create_model("convnext_atto", num_classes=0).state_dict(), tmp / "atto.pth"
    )  # "pretrained"
    single = {
        "head": run_experiment(_cfg(tmp, "one-head", *HEAD)).to_dict(),
        "gradual": run_experiment(_cfg(tmp, "one-gradual", *_gradual(tmp))).to_dict(),
        "partial": run_experiment(_cfg(tmp, "one-partial", *PARTIAL)).to_dict(),
    }
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    ddp = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return tmp, single, ddp


def _model(tmp: Path, name: str) -> dict:
    return load_checkpoint(tmp / name / "last.pt")["model"]


def _metrics(tmp: Path, name: str) -> list[list[float]]:
    rows = (tmp / name / "metrics.csv").read_text().splitlines()[1:]
    return [[float(v) for v in r.split(",")[:6]] for r in rows]  # epoch .. lr (times differ)


# Weights of 2 processes against 1: DDP's averaged gradient differs from one batch's in float32
# rounding only. Gradual (pixels through ConvNeXt, Adam at 3e-3) amplifies it most: on an Intel
# Xeon (AVX-512, no AMX) one weight of 81,920 ended 1.2e-5 apart (AMD Zen 4 stayed under 1e-5).
ATOL = {"head": 1e-5, "gradual": 3e-5, "partial": 1e-5}


@pytest.mark.parametrize("kind", ["head", "gradual", "partial"])
def test_two_processes_match_one(runs, kind):
    tmp, single, ddp = runs
    a, b = _model(tmp, f"one-{kind}"), _model(tmp, f"ddp-{kind}")
    assert a.keys() == b.keys() and not any(
        k.startswith("module.") for k in b
    )  # the unwrapped model
    for k in a:
        torch.testing.assert_close(
            b[k], a[k], rtol=1e-4, atol=ATOL[kind], msg=lambda m, k=k: f"{kind}: {k}: {m}"
        )
    for ra, rb in zip(_metrics(tmp, f"one-{kind}"), _metrics(tmp, f"ddp-{kind}"), strict=True):
        assert rb == pytest.approx(ra, rel=1e-4, abs=1e-5)
    for split in ("train", "val", "test"):
        for rank in range(WORLD):  # every rank reports the same, all-reduced metrics
            assert ddp[rank][kind][split]["acc"] == pytest.approx(
                single[kind][split]["acc"], abs=1e-9
            )
            assert ddp[rank][kind][split]["loss"] == pytest.approx(
                single[kind][split]["loss"], rel=1e-4
            )
    assert ddp[0][kind]["world_size"] == WORLD


def test_only_rank_0_writes_and_cache_is_in_sample_order(runs):
    tmp, single, ddp = runs
    names = {p.name for p in (tmp / "ddp-head").iterdir()}
    assert {
        "metrics.csv",
        "last.pt",
        "best.pt",
        "summary.json",
        "config.yaml",
        "curves.png",
    } <= names
    assert not [
        p
        for p in (tmp / "ddp-head").iterdir()
        if p.name.startswith(".") and p.name not in (RunDir.LOCK, RunDir.MARKER)
    ]  # no stray temp files (the lock stays: it is how a second writer is refused)
    from transferlab.features import cache as fcache

    for split in ("train", "val", "test"):  # sharded extraction == single-process extraction
        key = single["head"]["feature_cache"][split]["key"]
        assert ddp[0]["head"]["feature_cache"][split]["key"] == key
        one = fcache.load_entry(tmp / "cache-one-head", key)[0]
        two = fcache.load_entry(tmp / "cache-ddp-head", key)[0]
        assert torch.equal(one["labels"], two["labels"])
        torch.testing.assert_close(two["features"], one["features"], rtol=1e-4, atol=1e-5)


def test_resume_under_two_processes_continues_exactly(runs):
    tmp, _, ddp = runs
    assert [d["stopped"] for d in ddp] == [130, 130]  # rank 1 stopped too, at the same step
    resumed, straight = _model(tmp, "ddp-resume"), _model(tmp, "ddp-head")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)
    for ra, rb in zip(_metrics(tmp, "ddp-resume"), _metrics(tmp, "ddp-head"), strict=True):
        assert ra == pytest.approx(rb, rel=1e-5)
    resumed, head = ddp[0]["resumed"]["test"], ddp[0]["head"]["test"]
    for key in ("loss", "acc", "balanced_acc", "macro_f1"):  # per_class: a list, not a number
        assert resumed[key] == pytest.approx(head[key]), key
    assert resumed["per_class"] == head["per_class"]


def test_eval_counts_each_sample_once_and_extract_keeps_order(runs):
    _, _, ddp = runs
    for d in ddp:
        loss, acc = d["eval"]
        assert acc == pytest.approx(5 / 7)  # a padded 8th sample would give 5/8 or 6/8
        assert torch.equal(d["extract"], torch.arange(14, dtype=torch.float32).reshape(7, 2))
        assert d["shared_error"] is not None and "data file not found" in d["shared_error"]
    assert ddp[0]["shared_error"].startswith("rank 1: ")


def test_global_batch_is_the_single_process_batch():
    """Rank shards of global batch b together are exactly the single-process batch b."""
    images, labels = torch.zeros(50, 1), torch.arange(50)
    one = [y.tolist() for _, y in TensorLoader(images, labels, 10, True, seed=3)]
    ranks = [
        [y.tolist() for _, y in TensorLoader(images, labels, 5, True, seed=3, rank=r, world_size=2)]
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for b, batch in enumerate(one):
        assert sorted(ranks[0][b] + ranks[1][b]) == sorted(batch)


def test_one_failed_rank_ends_the_torchrun_job(tmp_path):
    """torchrun tears the group down when a rank exits non-zero: every rank ends, nothing hangs."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    write_cifar_like(tmp_path / "data", 40, 10)
    env = {**os.environ, "TRANSFERLAB_FAIL_RANK": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        torchrun,
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "transferlab",
        "train",
        "--model",
        "cnn",
        "--data-dir",
        str(tmp_path / "data"),
        "--val-size",
        "10",
        "--device",
        "cpu",
        "--no-progress",
        "--epochs",
        "1",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "failure injected by TRANSFERLAB_FAIL_RANK=1" in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_batch_size_must_split_over_ranks():
    from transferlab.plan import per_rank

    assert per_rank(20, DistEnv(rank=0, world_size=4)) == 5
    with pytest.raises(UserError, match="divide evenly over 3"):
        per_rank(20, DistEnv(rank=0, world_size=3))


if __name__ == "__main__":  # pragma: no cover - python tests/test_ddp.py
    sys.exit(pytest.main([__file__, "-q"]))
