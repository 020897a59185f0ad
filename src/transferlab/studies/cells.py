"""A study's cells as serialisable specs, and the function a worker runs on one.

A :class:`CellSpec` is everything a worker needs, with nothing shared in memory with the driver:
the cell's config as a dict (its ``data`` section is the data reference: dataset, data dir,
split seed; ``data.per_class`` and ``data.subset_seed`` are the subset recipe), its run dir,
and the torch threads it may use. An :class:`ExtractSpec` is a frozen arm's extraction task: it
fills the feature cache with the arm's three splits before the arm's cells start, and those
cells then require the cache (``run.require_feature_cache``): a worker that cannot see the
entry fails its cell with a clear message instead of extracting again.

``run_task`` runs either spec and returns an :class:`Outcome`; it never raises for a failure of
the cell itself (that is the outcome), so the same function serves every executor.
``train_argv`` gives the ``transferlab train`` command that reproduces a cell (``--plan``).

Usage:
    spec = cell_spec(cell, threads=1)
    outcome = run_task(spec)                   # in any process that can see the data and dirs
    print(outcome.status, outcome.test_acc)
    argv = train_argv(spec)                    # ["transferlab", "train", "--model", "cnn", ...]
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from transferlab.config import (
    SECTIONS,
    Config,
    config_from_dict,
    config_to_dict,
    flags_of,
    kind_of,
    load_yaml,
    resolve_preset,
)
from transferlab.data.load import load_data
from transferlab.data.subsets import subset_split
from transferlab.errors import TrainingStopped, UserError
from transferlab.experiment import extract_features, run_experiment
from transferlab.plan import uses_feature_cache
from transferlab.rundir import RunDir, Summary
from transferlab.studies.grid import Cell, data_fields

log = logging.getLogger(__name__)

# config fields that do not change a cell's result: a resumed study may differ in them
IGNORED_FIELDS = {
    ("run", "overwrite"),
    ("run", "progress"),
    ("run", "device"),
    ("run", "cache_dir"),
    ("run", "run_dir"),
    ("run", "require_feature_cache"),
    ("run", "threads"),
    ("data", "extract_per_class"),  # which rows of the split a frozen arm extracted
    ("data", "extract_seeds"),
}


def _never() -> bool:
    return False


@dataclass(frozen=True)
class CellSpec:
    """One cell as plain data: picklable, JSON-able (``--plan`` prints it)."""

    name: str  # "cnn:scratch @ 4/class, seed 0"
    arm: str  # the arm's spec
    preset: str  # the arm's preset ("" = none): train_argv passes it as --preset
    per_class: int  # 0 = all training images (the subset recipe, with the seed)
    seed: int
    n_train: int
    run_dir: str
    config: dict[str, dict[str, Any]]  # config_to_dict of the cell's Config
    threads: int | None = None  # torch threads in the cell (None: leave the process's own)
    kind: str = "cell"

    @property
    def key(self) -> str:
        """A stable id (the run dir) for retries and outcomes."""
        return self.run_dir

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ExtractSpec:
    """A frozen arm's extraction task: its three splits into the feature cache, once."""

    name: str  # "extract timm:tf_efficientnet_lite0:frozen"
    arm: str
    config: dict[str, dict[str, Any]]  # the config of the arm's first cell
    threads: int | None = None
    kind: str = "extract"

    @property
    def key(self) -> str:
        return "extract " + self.arm


@dataclass(frozen=True)
class Outcome:
    """What one task did: ok or failed (with its message), timings, test accuracy."""

    key: str
    name: str
    status: str  # ok | failed | stopped
    message: str = ""
    test_acc: float | None = None
    seconds: float = 0.0
    kind: str = "cell"
    extra: dict[str, Any] = field(default_factory=dict)  # an extraction: {split: cache hit}


def cell_spec(cell: Cell, threads: int | None = None, require_cache: bool = False) -> CellSpec:
    """The spec of a planned cell; ``require_cache``: its arm's extraction task ran first."""
    d = config_to_dict(cell.config)
    d["run"]["require_feature_cache"] = bool(require_cache and uses_feature_cache(cell.config))
    return CellSpec(
        name=cell.name,
        arm=cell.arm.spec,
        preset=cell.arm.preset,
        per_class=cell.per_class,
        seed=cell.seed,
        n_train=cell.n_train,
        run_dir=str(cell.run_dir),
        config=d,
        threads=threads,
    )


def extract_spec(cell: Cell, threads: int | None = None) -> ExtractSpec:
    """The extraction task of a frozen arm, from its first cell."""
    return ExtractSpec(
        name=f"extract {cell.arm.spec}",
        arm=cell.arm.spec,
        config=config_to_dict(cell.config),
        threads=threads,
    )


# --- the state of a cell on disk -----------------------------------------------------------------


def comparable(d: dict[str, Any], auto_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sections of a config dict without the fields that do not change results. Fields that
    ``auto_from`` (the wanted config) leaves to the run ("auto", image size 0) are dropped too: a
    run's config.yaml holds what they resolved to (plan.resolved_config_dict)."""
    ref = auto_from or {}

    def left_to_run(s: str, k: str) -> bool:
        want = (ref.get(s) or {}).get(k)
        return want == "auto" or ((s, k) == ("data", "image_size") and want == 0)

    return {
        s: {
            k: v
            for k, v in (d.get(s) or {}).items()
            if (s, k) not in IGNORED_FIELDS and not left_to_run(s, k)
        }
        for s in SECTIONS
    }


def saved_config_matches(run_dir: Path, cfg: Config) -> bool:
    """True when ``run_dir/config.yaml`` holds ``cfg`` (up to fields that do not change results)."""
    try:
        saved = yaml.safe_load(RunDir(run_dir).config.read_text())
    except (OSError, yaml.YAMLError):
        return False
    want = config_to_dict(cfg)
    return isinstance(saved, dict) and comparable(saved, want) == comparable(want, want)


def run_state(run_dir: Path, cfg: Config) -> str:
    """done | resume | new: what a (re)started study does with the cell in ``run_dir``."""
    files = RunDir(run_dir)
    if files.summary.is_file() and saved_config_matches(run_dir, cfg):
        return "done"
    if files.last.is_file() and saved_config_matches(run_dir, cfg):
        return "resume"
    return "new"


def check_subset(n_train: int, per_class: int, summary: Summary) -> None:
    """A cell's summary must report the subset it was planned with."""
    n = (summary.data.get("n") or {}).get("train")
    if per_class and n is not None and n != n_train:
        raise UserError(
            f"the run trained on {n} images, not {n_train} ({per_class} per class): "
            "run_experiment did not apply data.per_class"
        )


# --- running a task ------------------------------------------------------------------------------


def _dataset(cfg: Config, datasets: dict | None):
    """The cell's own data: loaded here (a worker), or once per data reference (``datasets``:
    the local executor's memo), then the cell's pixel subset applied (cached features pick their
    rows from the whole split inside the feature pipeline)."""
    if datasets is None:
        return None  # run_experiment loads it, subset included
    data = dataclasses.replace(cfg.data, per_class=0, extract_per_class=0)
    whole = dataclasses.replace(cfg, data=data)
    key = data_fields(cfg)
    if key not in datasets:
        datasets.clear()  # one data set at a time: a study has one
        datasets[key] = load_data(whole)
    ds = datasets[key]
    if cfg.data.per_class and not uses_feature_cache(cfg):
        ds = dataclasses.replace(
            ds, train=subset_split(ds.train, cfg.data.per_class, cfg.data.subset_seed)
        )
    return ds


def _train_cell(spec: CellSpec, cfg: Config, stop_requested, datasets: dict | None) -> Summary:
    run_dir = Path(spec.run_dir)
    state = run_state(run_dir, cfg)
    if state == "done":  # a retried task whose first attempt finished: nothing to redo
        return Summary.read(RunDir(run_dir).summary)
    RunDir(run_dir).failed.unlink(missing_ok=True)
    cfg.run.overwrite = state == "new" and run_dir.exists() and any(run_dir.iterdir())
    ds = _dataset(cfg, datasets)
    if state == "resume":
        log.info("resuming %s from %s", spec.name, RunDir(run_dir).last)
    summary = run_experiment(
        cfg, resume=state == "resume", dataset=ds, stop_requested=stop_requested
    )
    check_subset(spec.n_train, spec.per_class, summary)
    return summary


def run_task(
    spec: CellSpec | ExtractSpec,
    stop_requested: Callable[[], bool] = _never,
    progress: bool = False,
    datasets: dict | None = None,
) -> Outcome:
    """Run one cell (or extraction task) to its outcome; a failure is the outcome, not an error.

    ``spec.threads`` (``--cpus-per-cell``) becomes the run's ``--threads``: torch's threads in the
    task (run_experiment gives an in-process caller its own count back). A stop request
    (SIGINT/SIGTERM) gives a "stopped" outcome: the cell resumes from its last.pt next time.
    """
    t0 = time.perf_counter()
    try:
        cfg = config_from_dict(spec.config)
        cfg.run.progress = progress
        if spec.threads:
            cfg.run.threads = spec.threads
        if spec.kind == "extract":
            info = extract_features(cfg, stop_requested)
            hits = {k: v.hit for k, v in info.splits.items()}
            seconds = time.perf_counter() - t0
            return Outcome(spec.key, spec.name, "ok", seconds=seconds, kind=spec.kind, extra=hits)
        summary = _train_cell(spec, cfg, stop_requested, datasets)
        return Outcome(
            spec.key,
            spec.name,
            "ok",
            test_acc=summary.test["acc"],
            seconds=time.perf_counter() - t0,
        )
    except (TrainingStopped, KeyboardInterrupt) as e:
        if stop_requested() or isinstance(e, KeyboardInterrupt):
            return Outcome(spec.key, spec.name, "stopped", str(e), kind=spec.kind)
        return _failed(spec, e, t0)
    except Exception as e:  # noqa: BLE001 - a cell's failure ends only the cell
        return _failed(spec, e, t0)


def _failed(spec, e: BaseException, t0: float) -> Outcome:
    message = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
    return Outcome(
        spec.key, spec.name, "failed", message, seconds=time.perf_counter() - t0, kind=spec.kind
    )


# --- the train command of a cell (--plan) ---------------------------------------------------------

# fields a cell always states (the study sets them per cell), and fields that are no result's
_ALWAYS = ("model.name", "model.mode", "run.run_dir", "run.seed")
_NEVER = ("run.overwrite", "run.progress", "run.require_feature_cache")


def train_argv(spec: CellSpec) -> list[str]:
    """The ``transferlab train`` arguments that reproduce the cell's config."""
    preset = load_yaml(resolve_preset(spec.preset)) if spec.preset else {}
    base = config_to_dict(config_from_dict(preset))
    argv = ["transferlab", "train"] + (["--preset", spec.preset] if spec.preset else [])
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            dest, value = f"{section}.{f.name}", spec.config[section][f.name]
            if dest in _NEVER or (value == base[section][f.name] and dest not in _ALWAYS):
                continue
            flag = flags_of(f)[0]  # a bool's flag (--x, or --no-x for a True default) flips it
            if kind_of(f) is bool:
                argv += [flag] if value != f.default else []
            else:
                argv += [flag, str(value)]
    return argv
