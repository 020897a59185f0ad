"""Frozen-backbone experiment: live path vs feature cache (cold and warm), side by side.

Runs the seed's 10-epoch frozen experiment on real CIFAR-100 on this machine, in one process:
  (a) live: the backbone runs every epoch. On a CPU that takes hours, so it is timed on a fixed
      subset (``--live-images``) with the same step functions and scaled by image count; the
      output says so.
  (b) cached, cold: extract train/val/test features once (empty cache dir), train the head.
  (c) cached, warm: the same run again; extraction is skipped.
It prints a table, the ratios a/b and a/c, and extraction img/s against the bare backbone
forward (same batch size, precision and memory layout, random tensors already in memory).

Usage:
    python benchmarks/frozen_cache.py --data-dir ../shared/datasets --model resnet18 --weights none
    python benchmarks/frozen_cache.py --model timm:tf_efficientnet_lite0 --image-size 224 \
        --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from transferlab.config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig
from transferlab.data.preprocess import to_float_normalized
from transferlab.data.tensor_loader import TensorLoader
from transferlab.distributed import init_distributed
from transferlab.experiment import load_data, run_experiment
from transferlab.features.engines import resolve_engine
from transferlab.models.registry import build_model
from transferlab.precision import autocast, make_scaler
from transferlab.training.loop import StepContext, evaluate, train_one_epoch
from transferlab.training.optim import build_optimizer, build_scheduler


def make_cfg(args, run_dir: Path, cache_dir: Path, feature_cache: bool) -> Config:
    return Config(
        data=DataConfig(data_dir=args.data_dir, image_size=args.image_size, val_size=args.val_size),
        model=ModelConfig(name=args.model, weights=args.weights, mode="frozen"),
        optim=OptimConfig(
            epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size
        ),
        run=RunConfig(
            run_dir=str(run_dir),
            device=args.device,
            cache_dir=str(cache_dir),
            feature_cache=feature_cache,
            overwrite=True,
            progress=False,
            precision=args.precision,
        ),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare_forward_img_s(model, size: int, batch: int, precision: str, device, reps: int) -> float:
    """The backbone alone on random normalised tensors already on the device."""
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    with autocast(precision, device):
        model.features(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        with autocast(precision, device):
            model.features(x)
    sync(device)
    return batch * reps / (time.perf_counter() - t0)


def live_rates(args, ds, env, precision: str) -> tuple[float, float]:
    """img/s of the live path's train step and eval pass, on a fixed subset of training images."""
    cfg = make_cfg(args, Path("unused"), Path("unused"), feature_cache=False)
    torch.manual_seed(0)
    model = (
        build_model(cfg.model, len(ds.classes)).to(env.device).to(memory_format=torch.channels_last)
    )
    size = args.image_size or model.preprocess.input_size
    pp = model.preprocess

    def prepare(x):
        return to_float_normalized(x, pp.mean, pp.std, size, pp.interpolation, channels_last=True)

    n = args.live_images
    imgs, labels = ds.train.images[:n], ds.train.labels[:n]
    loader = TensorLoader(imgs, labels, args.batch_size, True, device=env.device)
    ctx = StepContext(device=env.device, precision=precision, env=env, params=[], progress=False)
    opt = build_optimizer(model, cfg.optim, 10.0)
    sched = build_scheduler(opt, cfg.optim, len(loader), 1)
    model.train()
    stats = train_one_epoch(
        lambda x: model(prepare(x)), loader, opt, sched, make_scaler(precision, env.device), ctx
    )
    eval_loader = TensorLoader(imgs, labels, args.eval_batch_size, False, device=env.device)
    model.eval()
    sync(env.device)
    t0 = time.perf_counter()
    evaluate(lambda x: model(prepare(x)), eval_loader, ctx)  # an EvalResult
    sync(env.device)
    return stats.img_per_s, n / (time.perf_counter() - t0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/datasets")
    p.add_argument("--model", default="resnet18")
    p.add_argument(
        "--weights", default="none", help="none is fine for timing; imagenet/PATH for accuracy"
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--eval-batch-size", type=int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--live-images", type=int, default=1000, help="subset for timing the live path")
    p.add_argument("--skip-cold", action="store_true", help="reuse --cache-dir as is (no cold run)")
    p.add_argument("--cache-dir", default="", help="default: a fresh temporary dir")
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p.parse_args()


def probe_backbone(args, ds, env, work: Path, cache_dir: Path) -> tuple[int, str, float]:
    """(image size, chosen precision, bare forward img/s) of the backbone on this device."""
    torch.manual_seed(0)
    probe_model = build_model(make_cfg(args, work, cache_dir, True).model, len(ds.classes)).to(
        env.device
    )
    probe_model = probe_model.to(memory_format=torch.channels_last).eval()
    size = args.image_size or probe_model.preprocess.input_size
    precision = resolve_engine(
        "torch", probe_model.backbone, args.model, size, env.device, cache_dir, args.precision, True
    ).precision
    bare = bare_forward_img_s(
        probe_model,
        size,
        args.eval_batch_size,
        precision,
        env.device,
        reps=3 if env.device.type == "cpu" else 20,
    )
    del probe_model
    return size, precision, bare


def run_cached(args, ds, env, work: Path, cache_dir: Path) -> dict:
    """The cached runs (cold unless --skip-cold, then warm): wall seconds, test acc, summary."""
    runs = {}
    for name in (["cold"] if not args.skip_cold else []) + ["warm"]:
        t0 = time.perf_counter()
        s = run_experiment(make_cfg(args, work / name, cache_dir, True), dataset=ds, env=env)
        runs[name] = {
            "wall_s": time.perf_counter() - t0,
            "test_acc": s.test["acc"],
            "summary": s.to_dict(),
        }
    return runs


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    env = init_distributed(args.device)
    ds = load_data(make_cfg(args, Path("x"), Path("x"), True))
    work = Path(tempfile.mkdtemp(prefix="frozen-cache-bench-"))
    cache_dir = Path(args.cache_dir) if args.cache_dir else work / "cache"
    if not args.skip_cold and cache_dir.exists():
        shutil.rmtree(cache_dir)

    size, precision, bare = probe_backbone(args, ds, env, work, cache_dir)
    runs = run_cached(args, ds, env, work, cache_dir)

    train_ips, eval_ips = live_rates(args, ds, env, precision)
    n_tr, n_va, n_te = len(ds.train), len(ds.val), len(ds.test)
    # Live 10-epoch run: each epoch trains on n_tr and validates on n_va; then test, and the final
    # train/val evaluation with the best weights (as our runner does on both paths).
    live_s = args.epochs * (n_tr / train_ips + n_va / eval_ips) + (n_te + n_tr + n_va) / eval_ips

    cold = runs.get("cold", {}).get("summary", {}).get("feature_cache") or {}
    extract_ips = (cold.get("train") or {}).get("img_s")
    rows = [(f"a) live (scaled from {args.live_images} images)", live_s, None)]
    if "cold" in runs:
        rows.append(("b) cached, cold", runs["cold"]["wall_s"], runs["cold"]["test_acc"]))
    rows.append(("c) cached, warm", runs["warm"]["wall_s"], runs["warm"]["test_acc"]))
    print(
        f"\nfrozen {args.model} at {size}px, {args.epochs} epochs, batch {args.batch_size}, "
        f"{precision}, device {env.device}, {torch.get_num_threads()} threads"
    )
    print(f"{'path':36s} {'wall s':>10s} {'test acc':>9s}")
    for label, secs, acc in rows:
        print(f"{label:36s} {secs:10.1f} {'' if acc is None else f'{acc:.4f}':>9s}")
    print(
        f"live train step {train_ips:.1f} img/s, live eval {eval_ips:.1f} img/s "
        f"(measured on {args.live_images} images, scaled to {n_tr}/{n_va}/{n_te})"
    )
    result = {
        "model": args.model,
        "image_size": size,
        "precision": precision,
        "device": str(env.device),
        "live_s_scaled": live_s,
        "live_train_img_s": train_ips,
        "live_eval_img_s": eval_ips,
        "bare_forward_img_s": bare,
        "extract_img_s": extract_ips,
        "runs": {k: {"wall_s": v["wall_s"], "test_acc": v["test_acc"]} for k, v in runs.items()},
    }
    if "cold" in runs:
        result["a_over_b"] = live_s / runs["cold"]["wall_s"]
        print(f"a/b = {result['a_over_b']:.1f}  (target >= 8)")
    result["a_over_c"] = live_s / runs["warm"]["wall_s"]
    print(f"a/c = {result['a_over_c']:.1f}  (target >= 100)")
    if extract_ips:
        result["extract_over_bare"] = extract_ips / bare
        print(
            f"extraction {extract_ips:.1f} img/s vs bare forward {bare:.1f} img/s = "
            f"{result['extract_over_bare']:.2f}  (target >= 0.9)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
