"""The files of a run besides its checkpoints and metrics rows.

At the start (:func:`write_run_header`): ``config.yaml`` (the config with its ``resolved:``
plan), ``model_summary.txt`` (torchinfo) and, for folder data, ``data_manifest.json``. At the
end (:func:`finish`): the best weights restored and evaluated, ``summary.json``,
``test_predictions.npz``, ``curves.png``, the reports, and MLflow tracking when asked for.

Usage:
    write_run_header(job, ds)
    summary = finish(job, state, t_start, setup_s, handle)
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict

import torch
from torchinfo import summary

from transferlab import __version__
from transferlab.classmetrics import class_metrics, confusion_matrix
from transferlab.data.tensor_loader import TensorLoader
from transferlab.distributed import broadcast_module, run_checked
from transferlab.errors import TrainingStopped
from transferlab.io import write_atomic
from transferlab.models.classifier import count_params
from transferlab.plan import save_resolved_config
from transferlab.report.mlflow_log import log_run
from transferlab.report.plots import plot_curves
from transferlab.report.run_report import write_reports
from transferlab.rundir import RunDir, Summary
from transferlab.training.checkpoint import load_checkpoint
from transferlab.training.fit import FitState, Job
from transferlab.training.loop import evaluate
from transferlab.training.predictions import collect_predictions, save_predictions

log = logging.getLogger(__name__)


def write_run_header(job: Job, ds) -> None:
    """config.yaml, model_summary.txt and (folder data) data_manifest.json; rank 0 only."""
    files = job.files
    save_resolved_config(job.cfg, job.plan, files.config)
    write_model_summary(job.model, job.cfg, job.plan.image_size, files.model_summary)
    if hasattr(ds, "write_manifest"):
        ds.write_manifest(files.manifest)


def write_model_summary(model, cfg, size: int, path) -> None:
    """torchinfo summary (layers, output shapes, parameter counts) of ``model`` at ``size`` px."""
    batch = cfg.optim.batch_size if size <= 64 else 1  # the seed's CNN summary uses batch 200
    device = next(model.parameters()).device
    was_training = model.training
    try:
        text = str(
            summary(
                model,
                input_size=(batch, 3, size, size),
                depth=3,
                verbose=0,
                device=device,
                col_names=("output_size", "num_params", "trainable"),
            )
        )
    finally:
        model.train(was_training)
    write_atomic(path, f"{cfg.model.name} ({cfg.model.mode})\n{text}\n")


def _restore_best(job: Job) -> None:
    best = job.files.best
    if best.is_file() or not job.env.is_main:  # rank 0 reads; a bad file stops every rank
        run_checked(
            lambda: job.model.load_state_dict(load_checkpoint(best)["model"]),
            job.env,
            main_only=True,
        )
    broadcast_module(job.model, job.env)  # every rank needs rank 0's best weights
    job.model.eval()


def _train_eval_loader(job: Job):
    """The training split without shuffling or augmentation (for the final train loss/acc)."""
    tl, env = job.pipe.train_loader, job.env
    if isinstance(tl, TensorLoader):
        return TensorLoader(
            tl.images,
            tl.labels,
            job.plan.eval_batch_per_rank,
            False,
            device=tl.device,
            rank=env.rank,
            world_size=env.world_size,
            augment=tl.augment if tl.images.dim() == 3 else None,
        )
    return tl.eval_view()


def split_metrics(loss: float, confusion, classes: list[str], top5_acc: float | None) -> dict:
    """summary.json's entry of an evaluated split: loss, acc, balanced acc, macro-F1, top-5,
    and the per-class precision/recall/F1/support (class order)."""
    if confusion is None:  # an empty split
        return {"loss": loss, "acc": float("nan")}
    m = class_metrics(confusion, classes)
    m["top5_acc"] = top5_acc
    return {"loss": loss, **m}


def test_metrics(loss: float, preds: dict, classes: list[str]) -> dict:
    """:func:`split_metrics` of the test predictions (true, pred, top-5 indices)."""
    if not preds:
        return {"loss": loss, "acc": float("nan")}
    cm = confusion_matrix(preds["true"], preds["pred"], len(classes))
    top5 = float((preds["top5"] == preds["true"][:, None]).any(1).mean())
    return split_metrics(loss, cm, classes, top5)


def build_summary(job: Job, state: FitState, results: dict, times: dict) -> Summary:
    """summary.json's content (``results``: train/val/test metrics; ``times``: seconds)."""
    cfg, fc = job.cfg, job.pipe.features
    return Summary(
        model=cfg.model.name,
        mode=cfg.model.mode,
        run_dir=str(job.run_dir),
        weights="n/a (scratch)" if cfg.model.mode == "scratch" else cfg.model.weights,
        params=count_params(job.model),
        train=results["train"],
        val=results["val"],
        test=results["test"],
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        stop_reason=state.stop_reason,
        time_s=times,
        data={
            "md5": job.data.md5,
            "split_seed": job.data.split_seed,
            "source": job.data.source,
            "classes": len(job.data.classes),
            "folder": job.data.folder,
            "n": {"train": job.data.n_train},
            "per_class": cfg.data.per_class or None,
            "subset_seed": cfg.data.subset_seed if cfg.data.per_class else None,
        },
        precision=job.plan.step_precision,
        image_size=job.plan.image_size,
        plan=job.plan.to_dict(),
        feature_cache=_feature_summary(fc) if fc else None,
        probe=state.probe or None,
        seed=cfg.run.seed,
        world_size=job.env.world_size,
        versions={
            "transferlab": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        fit_state=asdict(state),
    )


def _feature_summary(fc) -> dict:
    out = {"precision": fc.precision, "engine": fc.engine, "root": fc.root, "seconds": fc.seconds}
    out.update({name: asdict(s) for name, s in fc.splits.items()})
    return out


def finish(job: Job, state: FitState, t_start: float, setup_s: float) -> Summary:
    """Restore the best weights, evaluate train/val/test, write the end-of-run files."""
    _restore_best(job)
    t0 = time.perf_counter()
    p, classes = job.pipe, list(job.data.classes)
    train = evaluate(p.eval_forward, _train_eval_loader(job), job.ctx, desc="train (best)")
    val = evaluate(p.eval_forward, p.val_loader, job.ctx, "val (best)", len(classes))
    test_loss, test_acc, preds = collect_predictions(p.eval_forward, p.test_loader, job.ctx)
    final_eval_s = time.perf_counter() - t0
    results = {
        "train": {"loss": train.loss, "acc": train.acc},
        "val": split_metrics(val.loss, val.confusion, classes, val.top5_acc),
        "test": test_metrics(test_loss, preds, classes),
    }
    times = {
        "total": round(time.perf_counter() - t_start, 2),
        "train": round(state.train_s, 2),
        "eval": round(state.eval_s + final_eval_s, 2),
        "setup": round(setup_s, 2),
    }
    summary = build_summary(job, state, results, times)
    if job.env.is_main:
        _write_end_files(job, summary, preds)
    return summary


def _write_end_files(job: Job, summary: Summary, preds: dict) -> None:
    files = job.files
    try:
        summary.write(files.summary)
    except OSError as e:
        raise TrainingStopped(
            f"could not write {files.summary} ({e.strerror or e}); {RunDir.LAST}, "
            f"{RunDir.BEST} and {RunDir.METRICS} are intact"
        ) from None
    save_predictions(files.predictions, preds, list(job.data.classes))

    cfg = job.cfg
    plot_curves(files.metrics, files.curves, title=f"{cfg.model.name} ({cfg.model.mode})")
    if cfg.run.report:
        write_reports(job.run_dir)
    if cfg.run.track:
        log_run(job.run_dir, cfg.run.track)
