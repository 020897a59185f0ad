"""``--folds K``: a k-fold estimate for small data sets, with the test split untouched.

1. load the data once; pool train + val (the test split is left alone);
2. assign K stratified folds (each class dealt round-robin over a seeded permutation), refusing
   a class with fewer images than K (one line naming the class);
3. run fold i as an ordinary run in ``RUN_DIR/fold-i``: trained on the other K-1 folds,
   validated (best epoch, early stopping) on fold i, tested on the test split. Frozen runs share
   one extraction: each fold's dataset keeps the pooled splits and names its rows
   (``ImageDataset.fold``), so every fold hits the same cached train and val features;
4. the final model is the best fold (highest ``--select-by`` validation score): its files are
   linked into RUN_DIR, so ``predict``, ``export`` and ``report`` use it as any run. (Retraining on
   all of train + val would leave no validation data to pick its checkpoint; the best fold's
   test score is therefore a slightly optimistic pick among K, and the report says so);
5. RUN_DIR/summary.json is the best fold's, plus ``folds``: every fold's val and test accuracy
   and balanced accuracy, their mean and 95% Student-t interval over the K folds.

Usage:
    summary = run_folds(cfg)              # cfg.data.folds = 5; cfg.run.run_dir = "runs/k5"
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from statistics import mean

import torch

from transferlab.classmetrics import t_interval
from transferlab.config import Config
from transferlab.data.check import warn_test_leaks
from transferlab.data.cifar import FoldRows, ImageDataset
from transferlab.data.load import load_data
from transferlab.errors import UserError
from transferlab.experiment import run_experiment
from transferlab.plan import uses_feature_cache
from transferlab.report.mlflow_log import log_run
from transferlab.report.run_report import write_reports
from transferlab.rundir import RunDir, Summary, data_root, prepare_run_dir

log = logging.getLogger(__name__)

# the best fold's files that make RUN_DIR a run of its own (summary.json is rewritten)
LINKED = (
    RunDir.CONFIG,
    RunDir.BEST,
    RunDir.LAST,
    RunDir.METRICS,
    RunDir.MODEL_SUMMARY,
    RunDir.PREDICTIONS,
    RunDir.MANIFEST,
)


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Fold id (0..k-1, int64 (N,)) of each sample: per class, a seeded permutation dealt
    round-robin, so every fold holds floor or ceil(n_c / k) images of class c."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.int64)
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c, as_tuple=False).flatten()
        perm = members[torch.randperm(len(members), generator=g)]
        fold[perm] = torch.arange(len(perm)) % k
    return fold


def check_fold_counts(labels: torch.Tensor, classes: list[str], k: int) -> None:
    """Every class needs at least ``k`` images in train + val (one per fold): else one line."""
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    c = min(range(len(classes)), key=lambda i: (counts[i], i))
    if counts[c] < 2:
        raise UserError(
            f"--folds: class {classes[c]!r} has {counts[c]} image(s) in train+val; every class "
            "needs at least 2 (one to train on, one to validate): add images or remove the class"
        )
    if counts[c] < k:
        raise UserError(
            f"--folds {k}: class {classes[c]!r} has only {counts[c]} images in train+val, fewer "
            f"than the folds; use --folds {counts[c]} or fewer"
        )


def _pool(a, b):
    """train + val as one split (in-memory or folder)."""
    if hasattr(a, "images"):
        return type(a)(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]))
    return replace(a, paths=a.paths + b.paths, labels=torch.cat([a.labels, b.labels]))


def fold_dataset(ds: ImageDataset, pooled, fold: torch.Tensor, i: int, features: bool):
    """The dataset of fold ``i``: train on the other folds, validate on fold ``i``.

    On the feature path the pooled train and val splits stay as they are (their cache keys
    stay the same: one extraction for every fold) and ``fold`` names the rows.
    """
    train_idx = torch.nonzero(fold != i, as_tuple=False).flatten()
    val_idx = torch.nonzero(fold == i, as_tuple=False).flatten()
    out = copy.copy(ds)
    if features:
        out.fold = FoldRows(train_idx, val_idx)
    else:
        out.train, out.val = _take(pooled, train_idx), _take(pooled, val_idx)
    return out


def _take(split, idx: torch.Tensor):
    if hasattr(split, "subset"):
        return split.subset(idx)
    return type(split)(split.images[idx], split.labels[idx])


def aggregate(summaries: list[Summary], select_by: str) -> dict:
    """summary.json's ``folds``: per-fold figures, mean and 95% interval, and the chosen fold."""
    per = [
        {
            "fold": i + 1,
            "run_dir": s.run_dir,
            "best_epoch": s.best_epoch,
            "val_acc": s.val.get("acc"),
            "val_balanced_acc": s.val.get("balanced_acc"),
            "test_acc": s.test.get("acc"),
            "test_balanced_acc": s.test.get("balanced_acc"),
            "time_s": s.time_s.get("total"),
        }
        for i, s in enumerate(summaries)
    ]
    out = {"k": len(per), "per_fold": per}
    for key in ("val_acc", "val_balanced_acc", "test_acc", "test_balanced_acc"):
        m, h = t_interval([float(p[key]) for p in per])
        out[key] = {"mean": m, "half_width_95": h, "low": m - h, "high": m + h}
    best = max(range(len(per)), key=lambda i: (per[i][select_by], -i))
    out["final_model"] = {
        "choice": "best fold",
        "fold": best + 1,
        "by": select_by,
        "note": "the fold with the highest validation score; its test score is one of K, "
        "picked on validation (the interval above is the estimate to quote)",
    }
    out["mean_best_epoch"] = mean(p["best_epoch"] for p in per)
    return out


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # no hard links here: copy
        shutil.copy2(src, dst)


def run_training(cfg: Config, stop_requested=lambda: False) -> Summary:
    """A new ``train``: K fold runs under ``--folds K``, else one run (CLI and API call this)."""
    if cfg.data.folds:
        return run_folds(cfg, stop_requested)
    return run_experiment(cfg, stop_requested=stop_requested)


def run_folds(cfg: Config, stop_requested=lambda: False) -> Summary:
    """K fold runs inside ``cfg.run.run_dir``, the best fold as the run's model; the summary."""
    k = cfg.data.folds
    d = cfg.data
    handle = prepare_run_dir(
        cfg.run.run_dir or None,
        False,
        cfg.run.overwrite,
        data_root=data_root(d.dataset, d.data_dir),
        stem=f"{cfg.model.name}-folds{k}",
    )
    try:
        return _run_folds(cfg, RunDir(handle.run_dir), handle, stop_requested)
    except BaseException:
        handle.rollback()
        raise
    finally:
        handle.release()


def _run_folds(cfg: Config, files: RunDir, handle, stop_requested) -> Summary:
    k = cfg.data.folds
    ds = load_data(cfg)
    pooled = _pool(ds.train, ds.val)
    check_fold_counts(pooled.labels, list(ds.classes), k)
    fold = stratified_folds(pooled.labels, k, cfg.data.split_seed)
    features = uses_feature_cache(cfg)
    if cfg.data.check_data and hasattr(ds.test, "paths"):
        warn_test_leaks(ds)  # once here, not once per fold
    summaries = []
    for i in range(k):
        sub = copy.deepcopy(cfg)
        sub.data.folds, sub.data.check_data = 0, False
        sub.run.run_dir = str(files.fold(i + 1))
        sub.run.report = cfg.run.report
        sub.run.track = ""  # the final run is tracked, not each fold
        log.info("--folds %d: fold %d of %d in %s", k, i + 1, k, sub.run.run_dir)
        fds = fold_dataset(ds, pooled, fold, i, features)
        summaries.append(run_experiment(sub, dataset=fds, stop_requested=stop_requested))
        handle.commit()  # a finished fold: an --overwrite's old run can go
    agg = aggregate(summaries, cfg.optim.select_by)
    best = agg["final_model"]["fold"]
    src = RunDir(Path(summaries[best - 1].run_dir))
    for name in LINKED:
        if (src / name).is_file():
            _link(src / name, files / name)
    final = replace(summaries[best - 1], run_dir=str(files.path), folds=agg)
    final.write(files.summary)
    for key in ("test_acc", "test_balanced_acc"):
        a = agg[key]
        log.info(
            "--folds %d: %s %.4f +- %.4f (95%% interval over folds)",
            k,
            key,
            a["mean"],
            a["half_width_95"],
        )
    if cfg.run.report:
        write_reports(files.path)
    if cfg.run.track:  # the run dir's model and the fold aggregate (the folds are not logged)
        log_run(files.path, cfg.run.track)
    return final
