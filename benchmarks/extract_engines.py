"""Frozen-backbone inference engines on this CPU, side by side (issue 13).

Default mode (``engines``): lite0 (timm ``tf_efficientnet_lite0``) and ResNet-18 (torchvision,
fc = Identity) at 224 px, random weights, random input, several batch sizes, in alternating rounds:
torch fp32 (NCHW), torch bf16 + channels_last, torch.compile (bf16 + channels_last),
onnxruntime CPU EP (fp32), OpenVINO fp32 and bf16, each sync (one call at a time) and async
(AsyncInferQueue, PERFORMANCE_HINT=THROUGHPUT). For each: img/s (best and median of the rounds),
the max abs feature difference against torch fp32, and MACs/image x img/s against the CPU's peak.
Then, unless ``--no-accuracy``: real lite0 ImageNet weights (``transferlab.models``, offline) on a
real CIFAR-100 subset: features per engine, an L-BFGS linear probe on each, and the test accuracy
difference against the torch fp32 features.

``--pipeline``: lite0 extraction through ``transferlab.features.extract`` (real weights, real CIFAR
images at 32 px, resize + normalise to 224 included, loader batch 200) against the same engine's
bare throughput on ready float batches, alternating, for torch bf16 and OpenVINO bf16 (and the
``auto`` choice). ``--churn``: torch bf16 lite0 at batch 200 in two fresh processes, with and
without ``reuse_freed_memory()``: img/s, user/system seconds and minor page faults.

``--int8`` (issue 25), in one run on this CPU:
1. extraction img/s of lite0, lite1 and lite2 (real weights, each at its own size: 224, 240,
   260 px) on OpenVINO fp32, bf16 and int8 (async, batch 32, ready float batches of real CIFAR
   images, alternating rounds); int8 is the tool's own: NNCF on 300 seeded training images;
2. the frozen head's test accuracy on real CIFAR-100 for each model and precision, all/class and
   16/class: real ``transferlab train`` runs (``--feature-precision P --engine openvino``), one
   feature cache shared by the per-class runs;
3. predict's top-1 agreement between lite0's int8 and bf16 runs (all/class) on the first
   ``--agree-n`` test images, each run through ``load_run_model`` (its own engine and head);
4. with ``--main-job``: the README's main job, cold, with ``--feature-precision int8``.

Usage (2 cores, shared; a few minutes each):
    nice -n 5 python benchmarks/extract_engines.py                  # engines table + accuracy
    nice -n 5 python benchmarks/extract_engines.py --pipeline       # extract path vs bare engine
    python benchmarks/extract_engines.py --churn
    python benchmarks/extract_engines.py --rounds 5 --n-batches 6 --probe-train 5000  # longer
    python benchmarks/extract_engines.py --int8 --main-job --out /tmp/int8      # issue 25 (long)
    python benchmarks/extract_engines.py --int8 --smoke --out /tmp/int8s        # a quick check
    python benchmarks/extract_engines.py --int8 --int8-variants default,full-bc,mixed,last-fp32
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from transferlab.entry import reuse_freed_memory
from transferlab.features import cache as fcache
from transferlab.features.engines import (
    EngineChoice,
    TorchEngine,
    build_engine,
    engine_installed,
    resolve_engine,
)

CIFAR_DIR = os.environ.get("TRANSFERLAB_CIFAR_DIR", "/work/shared/datasets")
SIZE = 224


@dataclass(frozen=True)
class Variant:
    """One row of the table: an engine (built once per model) and how it is driven."""

    label: str
    engine: str  # torch | openvino | onnxruntime
    precision: str
    mode: str  # sync: one call at a time; async: engine.map (OpenVINO: async infer requests)
    compile: bool = False
    channels_last: bool = False


VARIANTS = (
    Variant("torch fp32", "torch", "fp32", "sync"),
    Variant("torch bf16+CL", "torch", "bf16", "sync", channels_last=True),
    Variant("torch.compile bf16+CL", "torch", "bf16", "sync", compile=True, channels_last=True),
    Variant("onnxruntime fp32", "onnxruntime", "fp32", "sync"),
    Variant("openvino fp32 sync", "openvino", "fp32", "sync"),
    Variant("openvino fp32 async", "openvino", "fp32", "async"),
    Variant("openvino bf16 sync", "openvino", "bf16", "sync"),
    Variant("openvino bf16 async", "openvino", "bf16", "async"),
)


# ----------------------------------------------------------------------------- models


def random_model(name: str) -> nn.Module:
    """lite0 (timm) or resnet18 (torchvision) with random weights and no classifier."""
    if name == "lite0":
        import timm

        return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Identity()
    return net.eval()


def macs_per_image(model: nn.Module) -> float:
    """Multiply-accumulates of one 224 px forward (FlopCounterMode counts 2 flops per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, SIZE, SIZE))
    return counter.get_total_flops() / 2


def cpu_peak() -> dict:
    """Peak MAC/s of this CPU from its clock and vector units (assumptions stated in 'basis')."""
    info = Path("/proc/cpuinfo").read_text()
    mhz = max(float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz"))
    model = next(
        (line.split(":")[1].strip() for line in info.splitlines() if line.startswith("model name")),
        "?",
    )
    cores = os.cpu_count() or 1
    flags = next(line for line in info.splitlines() if line.startswith("flags"))
    amx = "amx_bf16" in flags
    # fp32: 2 FMA pipes x 256-bit per core per cycle = 16 MACs (AMD Zen 4 runs AVX-512 on 256-bit
    # halves; Intel SPR: 2 x 512-bit = 32). bf16: VDPBF16PS does 2 MACs per fp32 lane = 2x fp32;
    # AMX (Intel only) would be 1024 bf16 MACs/cycle/core.
    fp32_per_cycle = 16 if "AMD" in model or "EPYC" in model else 32
    bf16_per_cycle = 1024 if amx else 2 * fp32_per_cycle
    return {
        "model": model,
        "cores": cores,
        "ghz": mhz / 1000,
        "amx": amx,
        "fp32_gmacs": cores * mhz / 1000 * fp32_per_cycle,
        "bf16_gmacs": cores * mhz / 1000 * bf16_per_cycle,
        "basis": f"{cores} cores x {mhz / 1000:.2f} GHz (/proc/cpuinfo) x {fp32_per_cycle} "
        f"fp32 MACs/cycle (2 FMA x 256-bit) or {bf16_per_cycle} bf16 MACs/cycle "
        f"({'AMX' if amx else 'AVX512_BF16 VDPBF16PS, no AMX on this CPU'})",
    }


def make_engine(v: Variant, model: nn.Module, root: Path, whash: str):
    """Build the engine of a variant (conversions cached under ``root``)."""
    choice = EngineChoice(v.engine, v.precision, 32)
    if v.engine != "torch":
        return build_engine(choice, model, SIZE, torch.device("cpu"), root, whash)
    net = model
    if v.channels_last:
        net = model.to(memory_format=torch.channels_last)
    if v.compile:
        net = torch.compile(net)
    return TorchEngine(net, choice, torch.device("cpu"), v.channels_last)


def run_batches(engine, mode: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run a list of ready batches: one call at a time (sync) or through ``engine.map``."""
    if mode == "sync":
        return [engine(x) for x in xs]
    return list(engine.map(iter(xs)))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- engines table


def build_variants(model: nn.Module, root: Path, log) -> dict[str, object]:
    """Every installed variant's engine for ``model`` (failures are reported and skipped)."""
    whash = fcache.weights_hash(model)
    engines = {}
    for v in VARIANTS:
        if not engine_installed(v.engine):
            log(f"  skip {v.label}: not installed")
            continue
        t = time.perf_counter()
        try:
            engines[v.label] = make_engine(v, model, root, whash)
            engines[v.label](torch.randn(2, 3, SIZE, SIZE))  # compile/warm-up outside the timing
        except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
            log(f"  skip {v.label}: {type(e).__name__}: {str(e)[:200]}")
            continue
        log(f"  built {v.label} in {time.perf_counter() - t:.1f}s")
    return engines


def table_for_model(name: str, args, root: Path, peak: dict, log) -> list[dict]:
    """Alternating rounds over variants x batch sizes for one model; one row per pair."""
    torch.manual_seed(0)
    model = random_model(name)
    macs = macs_per_image(model)
    log(f"{name}: {macs / 1e9:.3f} GMACs/image at {SIZE}px")
    ref_x = torch.randn(8, 3, SIZE, SIZE)
    with torch.inference_mode():
        ref = model(ref_x).float()
    engines = build_variants(model, root, log)
    by_label = {v.label: v for v in VARIANTS}
    diffs = {lab: (e(ref_x) - ref).abs().max().item() for lab, e in engines.items()}
    speeds: dict[tuple[str, int], list[float]] = {}
    for rnd in range(args.rounds):
        for bs in args.batches:
            xs = [torch.randn(bs, 3, SIZE, SIZE) for _ in range(args.n_batches)]
            for lab, e in engines.items():
                mode = by_label[lab].mode
                run_batches(e, mode, xs[:1])  # warm this batch shape
                dt = timed(lambda e=e, mode=mode, xs=xs: run_batches(e, mode, xs))
                speeds.setdefault((lab, bs), []).append(bs * len(xs) / dt)
        log(f"  round {rnd + 1}/{args.rounds} done")
    rows = []
    for (lab, bs), vals in speeds.items():
        best = max(vals)
        gmacs = macs * best / 1e9
        key = "bf16_gmacs" if by_label[lab].precision == "bf16" else "fp32_gmacs"
        rows.append(
            {
                "model": name,
                "variant": lab,
                "batch": bs,
                "img_s_best": round(best, 1),
                "img_s_median": round(statistics.median(vals), 1),
                "max_abs_diff": diffs[lab],
                "ref_max_abs": ref.abs().max().item(),
                "gmacs_per_s": round(gmacs, 1),
                "pct_of_peak": round(100 * gmacs / peak[key], 1),
            }
        )
    return rows


# ----------------------------------------------------------------------------- accuracy


def real_lite0() -> nn.Module:
    """lite0 with its ImageNet weights through transferlab.models (offline package)."""
    from transferlab.config import ModelConfig
    from transferlab.models.registry import build_model

    cfg = ModelConfig(name="timm:tf_efficientnet_lite0", weights="imagenet")
    return build_model(cfg, 100).eval()


def cifar_subset(n_train: int, n_test: int):
    """(train images, labels), (test images, labels): the first n of a fixed shuffle."""
    from transferlab.data.cifar import load_cifar100

    ds = load_cifar100(CIFAR_DIR, download=False, split_seed=0, val_size=5000)
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(ds.train), generator=g)[:n_train]
    te = torch.randperm(len(ds.test), generator=g)[:n_test]
    return (ds.train.images[tr], ds.train.labels[tr]), (ds.test.images[te], ds.test.labels[te])


def fit_probe(f_tr, y_tr, l2: float = 1e-3) -> Callable[[torch.Tensor], torch.Tensor]:
    """An L-BFGS softmax probe on standardised features; returns features -> predicted class.

    Self-contained (the same objective as features/probe.py) so this script does not depend on
    the training modules.
    """
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    x = (f_tr - mu) / sd
    w = torch.zeros(100, x.shape[1], requires_grad=True)
    b = torch.zeros(100, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=200, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y_tr) + l2 / 2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda f: (((f - mu) / sd) @ w.T + b).argmax(1)


def pct(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * (a == b).float().mean().item()


def accuracy_rows(args, root: Path, log) -> list[dict]:
    """Per engine/precision: probe accuracy on real lite0 features vs torch fp32's."""
    from transferlab.data.preprocess import to_float_normalized
    from transferlab.distributed import DistEnv
    from transferlab.features.extract import extract_with_engine

    model = real_lite0()
    pp = model.preprocess
    (x_tr, y_tr), (x_te, y_te) = cifar_subset(args.probe_train, args.probe_test)
    whash = fcache.weights_hash(model.backbone)
    env = DistEnv()
    prepare = lambda x: to_float_normalized(x, pp.mean, pp.std, SIZE, pp.interpolation)  # noqa: E731
    saved = root / f"accuracy_features_{args.probe_train}_{args.probe_test}.pt"
    feats = torch.load(saved) if saved.is_file() else {}  # resume after a crash of the probe
    for v in VARIANTS:
        twin = v.compile or (v.mode == "sync" and v.engine == "openvino")
        if twin or not engine_installed(v.engine) or v.label in feats:
            continue  # compile and sync give the same numbers as their plain/async twins
        e = make_engine(replace(v, compile=False), model.backbone, root, whash)
        t = time.perf_counter()
        out = [
            extract_with_engine(
                e,
                prepare,
                zip(x.split(200), y.split(200), strict=True),
                env,
                len(y),
                progress=False,
            )[0]
            for x, y in ((x_tr, y_tr), (x_te, y_te))
        ]
        feats[v.label] = out
        torch.save(feats, saved)
        log(f"  features {v.label}: {time.perf_counter() - t:.1f}s")
    ref_tr, ref_te = feats["torch fp32"]
    ref_probe = fit_probe(ref_tr, y_tr)
    ref_pred = ref_probe(ref_te)
    acc_ref = pct(ref_pred, y_te)
    rows = []
    for lab, (f_tr, f_te) in feats.items():
        acc = acc_ref if lab == "torch fp32" else pct(fit_probe(f_tr, y_tr)(f_te), y_te)
        rows.append(
            {
                "variant": lab,
                "probe_acc": round(acc, 2),
                "acc_diff": round(acc - acc_ref, 2),
                # predict's case: the head trained on torch fp32 features, run on these
                "top1_agree_torch_head": round(pct(ref_probe(f_te), ref_pred), 2),
                "max_abs_diff_real": (f_te - ref_te).abs().max().item(),
            }
        )
    log(f"  probe: {args.probe_train} train / {args.probe_test} test CIFAR-100 images, L2 1e-3")
    return rows


# ----------------------------------------------------------------------------- pipeline


def pipeline_rows(args, root: Path, log) -> list[dict]:
    """lite0 extraction through extract_with_engine vs the same engine bare, alternating."""
    from transferlab.data.preprocess import to_float_normalized
    from transferlab.data.tensor_loader import TensorLoader
    from transferlab.distributed import DistEnv
    from transferlab.features.extract import extract_with_engine

    model = real_lite0()
    pp = model.preprocess
    (x_tr, y_tr), _ = cifar_subset(args.pipeline_n, 1)
    whash = fcache.weights_hash(model.backbone)
    env = DistEnv()
    cpu = torch.device("cpu")
    auto = resolve_engine(
        "auto", model.backbone, "timm:tf_efficientnet_lite0", SIZE, cpu, root, "auto", True
    )
    log(f"  auto choice: {auto}")
    choices = {f"auto ({auto.name} {auto.precision} b{auto.batch_size})": auto}
    if not args.pipeline_skip_torch:
        choices["torch bf16 b32"] = EngineChoice("torch", "bf16", 32)
    if engine_installed("openvino"):
        choices["openvino bf16 b16"] = EngineChoice("openvino", "bf16", 16)
        choices["openvino bf16 b32"] = EngineChoice("openvino", "bf16", 32)
        choices["openvino bf16 b32, prepare 2 threads"] = EngineChoice("openvino", "bf16", 32)
    engines = {
        k: build_engine(c, model.backbone, SIZE, cpu, root, whash, channels_last=c.name == "torch")
        for k, c in choices.items()
    }
    for k, e in engines.items():
        if "prepare 2 threads" in k:  # the A/B of OpenVINOEngine.prepare_threads (default 1)
            e.prepare_threads = 2
    ready = {}  # the bare reference: prepared float batches, made outside the timing
    for lab, e in engines.items():
        b = e.choice.batch_size
        xs = x_tr[: (args.pipeline_n // 4 // b) * b]
        ready[lab] = [
            to_float_normalized(p, pp.mean, pp.std, SIZE, pp.interpolation) for p in xs.split(b)
        ]
    prepare = lambda x: to_float_normalized(x, pp.mean, pp.std, SIZE, pp.interpolation)  # noqa: E731
    speeds: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for lab, e in engines.items():
            n_bare = sum(x.shape[0] for x in ready[lab])
            dt = timed(lambda e=e, lab=lab: list(e.map(iter(ready[lab]))))
            speeds.setdefault((lab, "bare"), []).append(n_bare / dt)
            loader = TensorLoader(x_tr, y_tr, 200, False, device=cpu)
            _, img_s = extract_with_engine(e, prepare, loader, env, len(y_tr), progress=False)
            speeds.setdefault((lab, "extract"), []).append(img_s)
        log(
            f"  round {rnd + 1}/{args.rounds}: "
            + ", ".join(f"{k[0]} {k[1]} {v[-1]:.0f}" for k, v in speeds.items())
        )
    rows = []
    for lab in engines:
        bare, ext = speeds[(lab, "bare")], speeds[(lab, "extract")]
        rows.append(
            {
                "engine": lab,
                "bare_best": round(max(bare), 1),
                "extract_best": round(max(ext), 1),
                "bare_median": round(statistics.median(bare), 1),
                "extract_median": round(statistics.median(ext), 1),
                "ratio_median_of_rounds": round(
                    statistics.median([a / b for a, b in zip(ext, bare, strict=True)]), 3
                ),
            }
        )
    best_bare = max(max(speeds[(lab, "bare")]) for lab in engines)
    for r in rows:
        r["extract_vs_best_bare"] = round(r["extract_best"] / best_bare, 3)
    return rows


# ----------------------------------------------------------------------------- churn


def churn_child(fix: bool) -> dict:
    """torch bf16 lite0 at batch 200 (the old extraction batch) in this fresh process."""
    if fix:
        reuse_freed_memory()
    model = random_model("lite0").to(memory_format=torch.channels_last)
    x = torch.randn(200, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(3):
            model(x)
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "reuse_freed_memory": fix,
        "img_s": round(600 / dt, 1),
        "user_s": round(r1.ru_utime - r0.ru_utime, 2),
        "sys_s": round(r1.ru_stime - r0.ru_stime, 2),
        "minor_faults": r1.ru_minflt - r0.ru_minflt,
    }


def churn_rows(rounds: int) -> list[dict]:
    rows = []
    for _ in range(rounds):
        for fix in (False, True):
            out = subprocess.run(
                [sys.executable, __file__, "--churn-child", str(int(fix))],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


# ----------------------------------------------------------------------------- int8 (issue 25)

LITES = {"lite0": 224, "lite1": 240, "lite2": 260}  # timm tf_efficientnet_liteN, native size
INT8_PRECISIONS = ("fp32", "bf16", "int8")


def lite_model(name: str) -> nn.Module:
    """A lite with its ImageNet weights through transferlab.models (offline package)."""
    from transferlab.config import ModelConfig
    from transferlab.models.registry import build_model

    return build_model(ModelConfig(name=f"timm:tf_efficientnet_{name}", weights="imagenet"), 100)


def int8_speed_rows(args, root: Path, log) -> list[dict]:
    """img/s of OpenVINO fp32, bf16 and int8 per lite, alternating rounds, ready float batches."""
    from transferlab.data.preprocess import to_float_normalized
    from transferlab.features.quantize import CALIBRATION_MAX, Calibration, calibration_indices

    (x_tr, _), _ = cifar_subset(args.int8_speed_n + CALIBRATION_MAX, 1)
    cal_idx = calibration_indices(len(x_tr), 0)
    rows = []
    for name in args.lites:
        size = LITES[name]
        model = lite_model(name).eval()
        pp = model.preprocess
        prep = lambda x, s=size, pp=pp: to_float_normalized(x, pp.mean, pp.std, s, pp.interpolation)  # noqa: E731
        cal_batches = [prep(b) for b in x_tr[cal_idx].split(50)]
        cal = Calibration(f"bench-{name}", lambda cb=cal_batches: cb)
        whash = fcache.weights_hash(model.backbone)
        xs = [prep(b) for b in x_tr[: args.int8_speed_n].split(32)]
        engines = {}
        for prec in INT8_PRECISIONS:
            t = time.perf_counter()
            engines[prec] = build_engine(
                EngineChoice("openvino", prec, 32),
                model.backbone,
                size,
                torch.device("cpu"),
                root,
                whash,
                calibration=cal if prec == "int8" else None,
            )
            list(engines[prec].map(iter(xs[:1])))  # compile and warm outside the timing
            log(f"  {name} {prec}: built in {time.perf_counter() - t:.1f}s")
        speeds: dict[str, list[float]] = {}
        for rnd in range(args.rounds):
            for prec, e in engines.items():
                dt = timed(lambda e=e, xs=xs: list(e.map(iter(xs))))
                speeds.setdefault(prec, []).append(sum(len(x) for x in xs) / dt)
            log(
                f"  {name} round {rnd + 1}: "
                + ", ".join(f"{p} {v[-1]:.0f}" for p, v in speeds.items())
            )
        for prec, v in speeds.items():
            rows.append(
                {
                    "model": name,
                    "size": size,
                    "precision": prec,
                    "img_s_best": round(max(v), 1),
                    "img_s_median": round(statistics.median(v), 1),
                    "vs_bf16_median": round(
                        statistics.median(v) / statistics.median(speeds["bf16"]), 2
                    ),
                }
            )
    return rows


def train_run(args, name: str, prec: str, per_class: int) -> Path:
    """One real frozen run (a child ``transferlab train``): its run dir."""
    run = Path(args.out) / f"{name}-{prec}-pc{per_class or 'all'}"
    cmd = [sys.executable, "-m", "transferlab", "train", "--data-dir", CIFAR_DIR]
    cmd += ["--model", f"timm:tf_efficientnet_{name}", "--feature-precision", prec]
    cmd += ["--engine", "openvino", "--cache-dir", str(Path(args.out) / "cache")]
    cmd += ["--run-dir", str(run), "--overwrite", "--no-progress", "--no-report"]
    cmd += ["--per-class", str(per_class), "--device", "cpu"]
    if args.acc_train_subset:
        cmd += ["--train-subset", str(args.acc_train_subset)]
    if args.acc_test_subset:
        cmd += ["--test-subset", str(args.acc_test_subset)]
    if args.acc_epochs:
        cmd += ["--epochs", str(args.acc_epochs)]
    if args.acc_val_size:
        cmd += ["--val-size", str(args.acc_val_size)]
    subprocess.run(cmd, check=True)
    return run


def int8_accuracy_rows(args, log) -> tuple[list[dict], dict]:
    """Head test accuracy per lite, precision and per-class size; and the run dirs."""
    rows, runs = [], {}
    for name in args.lites:
        for per_class in args.acc_per_class:
            accs = {}
            ref = "bf16" if "bf16" in args.acc_precisions else args.acc_precisions[0]
            for prec in args.acc_precisions:
                t = time.perf_counter()
                run = train_run(args, name, prec, per_class)
                runs[(name, prec, per_class)] = run
                summary = json.loads((run / "summary.json").read_text())
                accs[prec] = 100 * summary["test"]["acc"]
                log(f"  {run.name}: test {accs[prec]:.2f} ({time.perf_counter() - t:.0f}s)")
            for prec, acc in accs.items():
                rows.append(
                    {
                        "model": name,
                        "per_class": per_class or "all",
                        "precision": prec,
                        "test_acc": round(acc, 2),
                        f"vs_{ref}_points": round(acc - accs[ref], 2),
                    }
                )
    return rows, runs


def int8_agreement(args, runs: dict, log) -> dict:
    """predict's top-1 agreement between lite0's int8 and bf16 runs (all/class), test images:
    each run as predict loads it (its own engine and head), and the same head (the bf16 run's)
    on int8 features, which isolates what quantisation changes from what head training does."""
    from transferlab.data.cifar import load_cifar100
    from transferlab.data.preprocess import to_float_normalized
    from transferlab.predict import _engine_forward, load_run_model

    ds = load_cifar100(CIFAR_DIR, download=False, split_seed=0, val_size=5000)
    images, labels = ds.test.images[: args.agree_n], ds.test.labels[: args.agree_n]
    ref = "bf16" if "bf16" in args.acc_precisions else args.acc_precisions[0]
    rms = {prec: load_run_model(runs[("lite0", prec, 0)], "cpu") for prec in ("int8", ref)}
    # the ref run's frozen backbone and head; int8 features from the int8 run's plan (the same
    # pretrained weights, so the same weights hash and quantised model)
    same_head = _engine_forward(
        rms[ref].model, rms["int8"].plan, torch.device("cpu"), rms["int8"].config
    )
    forwards = {"int8": rms["int8"].logits, ref: rms[ref].logits, "int8_same_head": same_head}
    preds = {}
    pre = rms[ref].preprocessing
    for name, fwd in forwards.items():
        out = []
        with torch.inference_mode():
            for x in images.split(250):
                x = to_float_normalized(
                    x, pre.mean, pre.std, rms[ref].image_size, pre.interpolation
                )
                out.append(fwd(x).argmax(1))
        preds[name] = torch.cat(out)
    row = {
        "images": len(labels),
        "against": ref,
        "top1_agreement_pct": round(pct(preds["int8"], preds[ref]), 2),
        "same_head_agreement_pct": round(pct(preds["int8_same_head"], preds[ref]), 2),
        "int8_acc": round(pct(preds["int8"], labels), 2),
        "int8_same_head_acc": round(pct(preds["int8_same_head"], labels), 2),
        f"{ref}_acc": round(pct(preds[ref], labels), 2),
    }
    log(f"  predict agreement: {row}")
    return row


def main_job_int8(args, log) -> dict:
    """The README's main job, cold (empty cache dir), with ``--feature-precision P`` for each P of
    --main-job-precisions (auto = what the README runs), one after another: wall s each."""
    out = {}
    for prec in args.main_job_precisions:
        cache = Path(args.out) / f"main-job-cache-{prec}"
        shutil.rmtree(cache, ignore_errors=True)
        run_dir = Path(args.out) / f"main-job-{prec}"
        cmd = [sys.executable, "-m", "transferlab", "compare", "--data-dir", CIFAR_DIR]
        cmd += ["--backbone", "timm:tf_efficientnet_lite0", "--feature-precision", prec]
        cmd += ["--run-dir", str(run_dir), "--overwrite"]
        load = os.getloadavg()[0]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "TRANSFERLAB_CACHE_DIR": str(cache)})
        wall = time.perf_counter() - t
        frozen = run_dir / "timm-tf_efficientnet_lite0-frozen" / "summary.json"
        summary = json.loads(frozen.read_text())
        out[prec] = {
            "wall_s": round(wall, 1),
            "frozen_test_acc": summary["test"]["acc"],
            "frozen_setup_s": summary["time_s"]["setup"],
            "load": [round(load, 2), round(os.getloadavg()[0], 2)],
        }
        log(f"  main job cold, --feature-precision {prec}: {out[prec]}")
    return out


INT8_VARIANTS = {  # name: quantize.Int8Settings fields (NNCF's knobs that cost no extra images)
    "default": {},
    "full-bc": {"fast_bias_correction": False},
    "mixed": {"preset": "mixed"},
    "last-fp32": {"fp32_last_conv": True},
    "full-bc+last-fp32": {"fast_bias_correction": False, "fp32_last_conv": True},
}


def int8_variant_rows(args, log) -> list[dict]:
    """lite0's int8 quantisation settings against fp32 and bf16: the L-BFGS probe's test
    accuracy on real CIFAR-100 features (--variant-train training images, --variant-test test
    images) and the extraction img/s, each variant calibrated on the same 300 training images."""
    from transferlab.data.preprocess import to_float_normalized
    from transferlab.features import engines as eng
    from transferlab.features import quantize

    (x_tr, y_tr), (x_te, y_te) = cifar_subset(args.variant_train, args.variant_test)
    model = lite_model("lite0").eval()
    pp = model.preprocess
    size = LITES["lite0"]

    def batches(x):  # prepared float batches, made as they are consumed (memory stays small)
        for b in x.split(32):
            yield to_float_normalized(b, pp.mean, pp.std, size, pp.interpolation)

    cal = list(batches(x_tr[quantize.calibration_indices(len(x_tr), 0)]))
    blob = eng._convert_openvino(model.backbone, torch.rand(2, 3, size, size))
    rows, ref = [], {}
    for name in ["fp32", "bf16", *args.int8_variants]:
        t = time.perf_counter()
        if name in ("fp32", "bf16"):
            prec, model_blob = name, blob
        else:
            settings = quantize.Int8Settings(**INT8_VARIANTS[name])
            prec = "int8"
            model_blob = eng._openvino_blob(
                quantize.quantize_model(eng._read_openvino(blob), cal, settings)
            )
        build_s = time.perf_counter() - t
        engine = eng.OpenVINOEngine(
            eng._load_openvino(model_blob, prec), EngineChoice("openvino", prec, 32)
        )
        list(engine.map(iter(cal[:1])))  # compile and warm outside the timing
        t = time.perf_counter()
        f_te = torch.cat(list(engine.map(batches(x_te))))
        img_s = len(x_te) / (time.perf_counter() - t)
        f_tr = torch.cat(list(engine.map(batches(x_tr))))
        acc = pct(fit_probe(f_tr, y_tr)(f_te), y_te)
        if name in ("fp32", "bf16"):
            ref[name] = acc
        row = {
            "variant": name,
            "probe_test_acc": round(acc, 2),
            "vs_fp32_points": round(acc - ref["fp32"], 2),
            "img_s": round(img_s, 1),
            "quantise_s": round(build_s, 1) if prec == "int8" else 0.0,
            "load": round(os.getloadavg()[0], 2),
        }
        log(f"  {row}")
        rows.append(row)
    return rows


def int8_results(args, root: Path, log) -> dict:
    out: dict = {}
    if args.int8_variants:
        out["variants"] = int8_variant_rows(args, log)
        print_rows(out["variants"], log)
        return out
    if not args.no_speed:
        out["speed"] = int8_speed_rows(args, root, log)
        print_rows(out["speed"], log)
    if not args.no_accuracy:
        out["accuracy"], runs = int8_accuracy_rows(args, log)
        print_rows(out["accuracy"], log)
        if "lite0" in args.lites:
            out["agreement"] = int8_agreement(args, runs, log)
    if args.main_job:
        out["main_job"] = main_job_int8(args, log)
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lite0,resnet18", help="'none': accuracy only")
    p.add_argument("--batches", default="16,32,64", help="batch sizes (images per call)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (best and median)")
    p.add_argument("--n-batches", type=int, default=3, help="batches per timing")
    p.add_argument("--no-accuracy", action="store_true", help="skip the real-weights probe")
    p.add_argument("--probe-train", type=int, default=2000)
    p.add_argument("--probe-test", type=int, default=1000)
    p.add_argument("--pipeline", action="store_true", help="extract path vs bare engine (lite0)")
    p.add_argument("--pipeline-n", type=int, default=3000, help="images per extraction")
    p.add_argument("--pipeline-skip-torch", action="store_true", help="OpenVINO rows only")
    p.add_argument("--churn", action="store_true", help="page-fault churn at batch 200")
    p.add_argument("--churn-child", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default="", help="converted models (default: a temp dir)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--int8", action="store_true", help="issue 25: fp32/bf16/int8 speed+accuracy")
    p.add_argument("--lites", default="lite0,lite1,lite2", help="--int8: which lites")
    p.add_argument("--int8-speed-n", type=int, default=640, help="--int8: images per timing")
    p.add_argument("--acc-train-subset", type=int, default=0, help="--int8: 0 = all 45,000")
    p.add_argument("--acc-test-subset", type=int, default=0, help="--int8: 0 = all 10,000")
    p.add_argument("--acc-epochs", type=int, default=0, help="--int8: 0 = the seed's 10")
    p.add_argument("--acc-val-size", type=int, default=0, help="--int8: 0 = the usual 5,000")
    p.add_argument("--acc-per-class", default="0,16", help="--int8: images per class (0 = all)")
    p.add_argument(
        "--acc-precisions",
        default=",".join(INT8_PRECISIONS),
        help="--int8: feature precisions of the accuracy runs (the first, or bf16, is the "
        "reference; drop bf16 on a CPU whose OpenVINO runs its bf16 hint as fp32)",
    )
    p.add_argument("--agree-n", type=int, default=2000, help="--int8: test images for predict")
    p.add_argument("--main-job", action="store_true", help="--int8: also the main job, cold")
    p.add_argument("--main-job-precisions", default="auto,int8", help="--main-job: which")
    p.add_argument("--no-speed", action="store_true", help="--int8: skip the img/s rounds")
    p.add_argument("--out", default="/tmp/int8-bench", help="--int8: runs and caches")
    p.add_argument("--smoke", action="store_true", help="--int8: lite0, tiny subsets")
    p.add_argument(
        "--int8-variants",
        default="",
        help=f"--int8: compare NNCF settings on lite0 only ({','.join(INT8_VARIANTS)})",
    )
    p.add_argument("--variant-train", type=int, default=10000, help="--int8-variants: probe train")
    p.add_argument("--variant-test", type=int, default=5000, help="--int8-variants: probe test")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.lites = args.lites.split(",")
    args.acc_per_class = [int(k) for k in args.acc_per_class.split(",")]
    args.acc_precisions = args.acc_precisions.split(",")
    args.main_job_precisions = args.main_job_precisions.split(",")
    args.int8_variants = [v for v in args.int8_variants.split(",") if v]
    if unknown := set(args.int8_variants) - set(INT8_VARIANTS):
        p.error(f"--int8-variants: unknown {sorted(unknown)}; choose from {list(INT8_VARIANTS)}")
    if args.smoke:
        args.lites, args.int8_speed_n, args.rounds = ["lite0"], 64, 1
        args.acc_train_subset, args.acc_test_subset, args.acc_epochs = 400, 200, 1
        args.acc_val_size, args.acc_per_class = 100, [0, 1]
        args.agree_n = 200
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.churn_child >= 0:
        print(json.dumps(churn_child(bool(args.churn_child))))
        return 0
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    reuse_freed_memory()  # every engine gets the allocator fix: the table compares engines
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    root = Path(args.cache_dir or tempfile.mkdtemp(prefix="engines-"))
    peak = cpu_peak()
    log(
        f"CPU: {peak['model']}; load average {os.getloadavg()[0]:.2f} (shared machine)\n"
        f"peak: fp32 {peak['fp32_gmacs']:.0f} GMAC/s, bf16 {peak['bf16_gmacs']:.0f} GMAC/s "
        f"({peak['basis']})"
    )
    results = {"cpu": peak, "torch_threads": torch.get_num_threads()}
    if args.churn:
        results["churn"] = churn_rows(args.rounds)
        for r in results["churn"]:
            log(json.dumps(r))
    elif args.int8:
        results["int8"] = int8_results(args, Path(args.out) / "engines", log)
    elif args.pipeline:
        results["pipeline"] = pipeline_rows(args, root, log)
        print_rows(results["pipeline"], log)
    else:
        models = [m for m in args.models.split(",") if m and m != "none"]
        results["engines"] = [r for m in models for r in table_for_model(m, args, root, peak, log)]
        print_rows(results["engines"], log)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        if not args.no_accuracy:
            results["accuracy"] = accuracy_rows(args, root, log)
            print_rows(results["accuracy"], log)
    log(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def print_rows(rows: list[dict], log) -> None:
    """A markdown table of dict rows (same keys)."""
    if not rows:
        return
    keys = list(rows[0])
    log("| " + " | ".join(keys) + " |")
    log("|" + "---|" * len(keys))
    for r in rows:
        log(
            "| "
            + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
            + " |"
        )


if __name__ == "__main__":
    sys.exit(main())
