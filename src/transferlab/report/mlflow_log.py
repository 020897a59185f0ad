"""Log a finished run to MLflow (``--track mlflow[:URI]``), from the run dir's files alone.

What is logged: the resolved config (config.yaml, flattened to ``section.key`` params), one
metric point per epoch and column of metrics.csv (``train_loss``, ``val_acc``, ``lr``,
``train_img_s``, ...; ``step`` = epoch), the summary's final figures (``test_acc``,
``best_epoch``, ``time_total_s``, ...), and as artifacts config.yaml, summary.json,
metrics.csv, curves.png, report.html and an exported model (``model.onnx``,
``model.torchscript.pt`` with its ``.json``) when the run dir holds one. Like the reports it
reads only the files, so any past run can be logged.

``--track mlflow`` uses a local store beside the runs, ``./mlruns`` (an SQLite database
``mlruns/mlflow.db`` and the artifacts under ``mlruns/artifacts``), so it works offline: MLflow
3 keeps its plain-file backend in maintenance mode and refuses it by default. ``mlflow:URI``
takes any tracking URI (``http://host:5000``, ``sqlite:///path.db``, ``databricks``) or a
folder, which becomes such a local store. Browse with ``mlflow ui --backend-store-uri
sqlite:///mlruns/mlflow.db``.

Tracking never decides the outcome of a training: a server that cannot be reached gets one
retry, then a warning, and the run dir stays as it is. ``mlflow.json`` in the run dir records
where the run was logged.

Usage:
    check_tracking_available("mlflow")            # before the data load: a UserError without mlflow
    log_run(Path("runs/cnn-20261128"), "mlflow")  # -> ./mlruns
    log_run(run_dir, "mlflow:http://127.0.0.1:5000")
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from transferlab.errors import UserError
from transferlab.io import write_json
from transferlab.rundir import RunDir, Summary

log = logging.getLogger(__name__)

EXPERIMENT = "transferlab"
DEFAULT_STORE = "mlruns"  # relative to the working directory, beside runs/
ARTIFACTS = (RunDir.CONFIG, RunDir.SUMMARY, RunDir.METRICS, RunDir.CURVES, RunDir.REPORT_HTML)
MODEL_FILES = ("model.onnx", "model.torchscript.pt")  # export.FORMATS' default names
RETRY_WAIT_S = 2.0
# Without these, MLflow's HTTP client retries 7 times with exponential backoff (minutes) before
# giving up on a server that is down; we retry once ourselves instead. A user's own settings win.
# while logging (unless the user set them): no HTTP retry storm, and no MLflow usage telemetry
# (a background thread that phones home; this tool works offline)
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


@dataclass(frozen=True)
class Target:
    """Where a run is logged: the tracking URI and, for a local store, the artifact root."""

    tracking_uri: str
    artifact_location: str | None  # None: the server's default


def check_tracking_available(track: str) -> None:
    """Fail early (before data loads) when ``track`` asks for MLflow and it is not installed."""
    if not track:
        return
    if track != "mlflow" and not track.startswith("mlflow:"):
        raise UserError(f"--track must be mlflow or mlflow:URI; got {track!r}")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError(
            "--track mlflow needs the mlflow package: pip install 'transferlab[mlflow]'"
        ) from None


def resolve_target(track: str) -> Target:
    """The tracking URI for ``mlflow`` or ``mlflow:URI``; a plain folder becomes a local store."""
    uri = track.partition(":")[2] if track.startswith("mlflow:") else ""
    if "://" in uri or uri.startswith("file:") or uri in ("databricks", "databricks-uc"):
        return Target(uri, None)
    root = Path(uri or DEFAULT_STORE).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return Target(f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri())


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """``{"data": {"image_size": 32}}`` -> ``{"data.image_size": "32"}`` (params are text)."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def epoch_metrics(metrics_csv: Path) -> list[tuple[str, float, int]]:
    """(key, value, step) for every epoch row and numeric column of metrics.csv; step = epoch."""
    if not metrics_csv.is_file():
        return []
    out = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row["epoch"]))
            out += [
                (k, float(v), step) for k, v in row.items() if k != "epoch" and v not in (None, "")
            ]
    return out


def summary_metrics(summary: Summary) -> dict[str, float]:
    """The final figures of summary.json as single-value metrics."""
    out = {}
    for split, result in (("train", summary.train), ("val", summary.val), ("test", summary.test)):
        for key in ("loss", "acc", "balanced_acc", "macro_f1", "top5_acc"):
            value = result.get(key)
            if isinstance(value, (int, float)):
                out[f"{split}_{key}_final"] = float(value)
    fit = summary.fit_state
    for key in ("best_val_acc",):
        if isinstance(fit.get(key), (int, float)):
            out[key] = float(fit[key])
    for key in ("best_epoch", "epochs_run"):
        if isinstance(getattr(summary, key), (int, float)):
            out[key] = float(getattr(summary, key))
    for key, value in summary.time_s.items():
        if isinstance(value, (int, float)):
            out[f"time_{key}_s"] = float(value)
    out.update(_fold_metrics(summary.folds or {}))
    return out


def _fold_metrics(folds: dict) -> dict[str, float]:
    """--folds K: the mean and 95% half-width of val/test accuracy and balanced accuracy."""
    out = {}
    for key in ("val_acc", "val_balanced_acc", "test_acc", "test_balanced_acc"):
        agg = folds.get(key) or {}
        for stat in ("mean", "half_width_95"):
            if isinstance(agg.get(stat), (int, float)):
                out[f"folds_{key}_{stat}"] = float(agg[stat])
    return out


@contextmanager
def _http_defaults():
    """HTTP_DEFAULTS in the environment for the duration (only where the user set nothing)."""
    added = [k for k in HTTP_DEFAULTS if k not in os.environ]
    for k in added:
        os.environ[k] = HTTP_DEFAULTS[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _log_once(run_dir: Path, target: Target) -> str:
    """One attempt: create the MLflow run, log everything, end it. Returns the MLflow run id."""
    from mlflow.entities import Metric, Param, RunStatus
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=target.tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(EXPERIMENT, artifact_location=target.artifact_location)
    )
    files = RunDir(run_dir)
    summary = Summary.read(files.summary)
    config = yaml.safe_load(files.config.read_text()) or {}
    tags = {
        "transferlab.run_dir": str(run_dir.resolve()),
        "model": str(summary.model),
        "mode": str(summary.mode),
    }
    run = client.create_run(exp_id, run_name=run_dir.name, tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        params = [Param(k, v[:6000]) for k, v in flatten(config).items()]  # MLflow's value limit
        metrics = [Metric(k, v, now, step) for k, v, step in epoch_metrics(files.metrics)]
        metrics += [Metric(k, v, now, 0) for k, v in summary_metrics(summary).items()]
        for i in range(0, max(len(params), 1), 100):  # log_batch takes at most 100 params per call
            client.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):  # and 1,000 metrics
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                client.log_artifact(run_id, str(run_dir / name))
        for name in MODEL_FILES:
            for path in (run_dir / name, run_dir / f"{name}.json"):
                if path.is_file():
                    client.log_artifact(run_id, str(path), artifact_path="model")
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    except BaseException:
        try:  # mark the half-logged run; the server may be the very thing that failed
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        except Exception:
            pass
        raise
    return run_id


def log_run(run_dir: Path, track: str) -> str | None:
    """Log ``run_dir`` to MLflow as ``track`` says; returns the MLflow run id, or None when the
    tracking server could not be reached twice (a warning; the run itself is unaffected)."""
    check_tracking_available(track)
    run_dir = Path(run_dir)
    for name in (RunDir.SUMMARY, RunDir.CONFIG):
        if not (run_dir / name).is_file():
            raise UserError(
                f"cannot log {run_dir} to MLflow: {name} is missing (is the run finished?)"
            )
    target = resolve_target(track)
    error: Exception | None = None
    with _http_defaults():
        for attempt in (1, 2):
            try:
                run_id = _log_once(run_dir, target)
                break
            except Exception as e:  # network, server or store errors of many kinds
                error = e
                if attempt == 1:
                    log.info(
                        "MLflow logging to %s failed (%s); retrying once",
                        target.tracking_uri,
                        _first_line(e),
                    )
                    time.sleep(RETRY_WAIT_S)
        else:
            log.warning(
                "could not log %s to MLflow at %s (%s); the run itself is complete",
                run_dir,
                target.tracking_uri,
                _first_line(error),
            )
            return None
    record = {"tracking_uri": target.tracking_uri, "experiment": EXPERIMENT, "run_id": run_id}
    write_json(RunDir(run_dir).mlflow, record, newline=True)
    log.info("logged %s to MLflow %s (run %s)", run_dir, target.tracking_uri, run_id)
    return run_id


def _first_line(e: BaseException | None) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"
