"""The Python face of transferlab: train, compare, study and load runs from a script or notebook.

The keyword options are the CLI flags in snake_case (``--image-size`` -> ``image_size=``,
``--no-channels-last`` -> ``no_channels_last=True``, also ``channels_last=False``), derived from
the config dataclasses by the same ``config.OptionSet`` as the CLI's flags: one source, one
coercion, one layering (defaults < ``config=``/``preset=`` < keywords). Bad input raises
:class:`transferlab.UserError` with the CLI's one-line message; nothing here calls ``sys.exit``
or configures the root logger. What these return (``Run``, ``Comparison``, ``Study``) reads
its directory's files: see ``transferlab.results``.

Usage:
    import transferlab as tl
    run = tl.train(model="cnn", epochs=2, data_dir="../shared/datasets", train_subset=5000)
    run.metrics.tail()                      # pandas DataFrame of metrics.csv
    cmp = tl.compare(data_dir="../shared/datasets", backbone="timm:tf_efficientnet_lite0")
    old = tl.load_run("runs/cnn-20261128-120000")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from transferlab.comparison import run_compare
from transferlab.config import (
    COMPARE,
    TRAIN,
    CompareConfig,
    Config,
    OptionSet,
    config_from_layers,
    resume_config,
)
from transferlab.errors import UserError
from transferlab.experiment import run_experiment
from transferlab.folds import run_training
from transferlab.results import Comparison, Run, Study
from transferlab.stopflag import StopFlag
from transferlab.studies.cli import STUDY, study_grid
from transferlab.studies.runner import run_study

log = logging.getLogger(__name__)


def build_config(
    config=None, *, preset: str | None = None, options: OptionSet = TRAIN, **kwargs
) -> Config:
    """A validated Config: defaults < ``config`` (a Config, a dict of sections, a YAML path) or
    ``preset`` < keyword options (the command's flags in snake_case)."""
    return config_from_layers(_base(config, preset), options.overrides(kwargs))


def _base(config, preset: str | None):
    """The layer under the keyword options: ``config=`` or ``preset=``, not both."""
    if config is not None and preset is not None:
        raise UserError("pass config= or preset=, not both")
    return config if config is not None else preset


def load_run(path: str | os.PathLike) -> Run:
    """A finished run dir as a :class:`Run`; a UserError names the missing file otherwise."""
    return Run(path)


def train(
    config=None,
    *,
    preset: str | None = None,
    resume: str | os.PathLike | None = None,
    **options,
) -> Run:
    """Train one model and return its :class:`Run`. Options are the ``transferlab train`` flags
    in snake_case (``model="cnn"``, ``epochs=10``, ``data_dir=...``, ``progress=False``), or
    ``config=`` (a Config, a dict of sections, or a YAML path); options win over
    ``config``/``preset``. ``resume=RUN_DIR`` continues a run; only ``device=``, ``progress=`` and
    ``epochs=`` (a larger budget) may change, as with ``--resume``.
    """
    if resume is not None:
        cfg, epochs = resume_config(resume, {**options, "preset": preset, "config": config})
        with StopFlag() as stop:
            summary = run_experiment(cfg, resume=True, stop_requested=stop, resume_epochs=epochs)
    else:
        cfg = build_config(config, preset=preset, **options)
        with StopFlag() as stop:
            summary = run_training(cfg, stop_requested=stop)  # with --folds: K folds, then all
    return Run(summary.run_dir)  # the run wrote its report and tracking itself (outputs.py)


def compare(config=None, *, preset: str | None = None, **options) -> Comparison:
    """The seed study (``transferlab compare``): CNN, frozen backbone, CNN chasing it.

    Options: the compare flags in snake_case: the shared ones of ``train`` (``data_dir=``,
    ``epochs=``, ...) and the fields of ``config.CompareConfig`` (``run_dir=``, ``backbone=``,
    ``chase_max_epochs=``, ``chase_patience=``, ``with_cnn_best=``, ...).
    """
    over = COMPARE.overrides(options)
    cc = CompareConfig(**over.pop("compare", {}))
    cfg = config_from_layers(_base(config, preset), over)
    with StopFlag() as stop:
        summaries = run_compare(cfg, cc, stop_requested=stop)
    return Comparison(Path(next(iter(summaries.values())).run_dir).parent)


def study(
    arms: str | Sequence[str] | None = None,
    per_class: str | Sequence[str | int] | None = None,
    seeds: int | None = None,
    **options,
) -> Study:
    """``transferlab study``: every arm x images per class x seed as a run dir in ``run_dir=``.

    ``arms``: ``"cnn:scratch,timm:tf_efficientnet_lite0:frozen"`` or a list; ``per_class``:
    ``"4,16,all"`` or a list. Other options are the study's flags in snake_case (``run_dir=``,
    ``min_steps=``, ``executor=``, ``cpus_per_cell=``, and the train options it applies to every
    cell), with the CLI's defaults. A
    study dir that is run again reruns no finished cell. Failed cells are logged and listed in
    ``Study.failed``.
    """
    if isinstance(arms, (list, tuple)):
        arms = ",".join(map(str, arms))
    if isinstance(per_class, (list, tuple)):
        per_class = ",".join(map(str, per_class))
    given = {"arms": arms, "per_class": per_class, "seeds": seeds, **options}
    sc, grid = study_grid(STUDY.overrides(given))
    with StopFlag() as stop:
        result = run_study(
            grid,
            Path(sc.run_dir),
            overwrite=sc.overwrite,
            stop_requested=stop,
            progress=grid.overrides.get("run", {}).get("progress", True),
            executor=sc.executor,
            resources=sc.resources(),
        )
    for name, message in result.failed:
        log.warning("study %s: failed cell %s: %s", sc.run_dir, name, message)
    return Study(sc.run_dir, result.failed)
