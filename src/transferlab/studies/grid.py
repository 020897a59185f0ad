"""A study's grid: arms x data sizes x seeds, parsed and checked before anything runs.

An arm is ``MODEL:MODE[:PRESET][:tuneN]`` where MODEL is ``cnn``, a torchvision classifier name
or ``timm:NAME`` (``cnn:scratch``, ``cnn:scratch:cnn-best``, ``timm:tf_efficientnet_lite0:frozen``,
``resnet18:finetune``, ``timm:tf_efficientnet_lite0:partial``). A last ``tuneN`` searches each
cell's head for N trials first (``--tune N``; frozen and partial arms):
``timm:tf_efficientnet_lite0:frozen:tune20``. Sizes are images per class (``4,16,64,all``) or
fractions of the smallest class (``0.01,0.1,all``). Seed ``s`` draws the nested subset
(``data.subset_seed``) and seeds the run (``run.seed``).

The training protocol (a fair budget for tiny subsets): a cell trains for at least
``min_steps`` optimiser steps; its epoch count is raised to ``ceil(min_steps / steps per
epoch)`` when the recipe's own epochs give fewer (a warm-up is stretched by the same factor), a
raised cell without a schedule stops early after ``patience`` epochs without a validation gain
(a OneCycle or cosine schedule runs to its end instead), and every cell is scored with its
best-validation weights. Validation and test are the full fixed splits.

Usage:
    grid = make_grid(["cnn:scratch", "timm:tf_efficientnet_lite0:frozen"], "4,16,all", seeds=3,
                     overrides={"data": {"data_dir": "../shared/datasets"}})
    cells = plan_cells(grid, class_counts={0: 450, 1: 450})
    cfg = cells[0].config
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.config import (
    MODES,
    Config,
    ModelConfig,
    config_from_dict,
    load_yaml,
    merge_dicts,
    resolve_preset,
)
from transferlab.errors import UserError
from transferlab.models.registry import resolve_name
from transferlab.plan import only_where_features_are_cached, uses_feature_cache

ALL = "all"
DEFAULT_MIN_STEPS = 300  # optimiser steps every cell gets at least (see the module docstring)
DEFAULT_PATIENCE = 10  # epochs without a val gain before a raised cell stops


@dataclass(frozen=True)
class Arm:
    """One model + training mode (+ preset): a line in the study's plots."""

    spec: str  # as written on the command line, e.g. "timm:tf_efficientnet_lite0:frozen"
    model: str  # config model.name: "cnn", "resnet18", "timm:tf_efficientnet_lite0"
    mode: str  # scratch | frozen | finetune | gradual
    preset: str = ""  # preset name or YAML path ("" = none)
    tune: int = 0  # trials of each cell's head search (0 = none)

    @property
    def key(self) -> str:
        """The arm's folder name: the spec with ':' as '-', stable across runs. A spec with other
        characters than letters, digits and ``._-:`` (a preset path) gets a short hash of the
        spec too, so that two arms never share a folder (``a/b.yaml`` vs ``a-b.yaml``)."""
        slug = re.sub(r"[^A-Za-z0-9._-]", "-", self.spec.replace(":", "-"))
        if re.fullmatch(r"[A-Za-z0-9._:-]+", self.spec):
            return slug
        return f"{slug}-{hashlib.sha256(self.spec.encode()).hexdigest()[:8]}"

    @property
    def pretrained(self) -> bool:
        return self.mode != "scratch"


@dataclass(frozen=True)
class Grid:
    """What a study runs; saved as study.json and compared on resume."""

    arms: tuple[Arm, ...]
    sizes: tuple[str, ...]  # as given: "4", "0.1", "all"
    seeds: int
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # flags for every cell
    min_steps: int = DEFAULT_MIN_STEPS
    patience: int = DEFAULT_PATIENCE

    def to_dict(self) -> dict[str, Any]:
        return {
            "arms": [a.spec for a in self.arms],
            "sizes": list(self.sizes),
            "seeds": self.seeds,
            "overrides": self.overrides,
            "min_steps": self.min_steps,
            "patience": self.patience,
        }


@dataclass(frozen=True)
class Cell:
    """One arm x one data size x one seed, with the config it runs."""

    arm: Arm
    per_class: int  # 0 = all training images
    seed: int
    run_dir: Path
    config: Config
    n_train: int  # training images this cell uses

    @property
    def name(self) -> str:
        return f"{self.arm.spec} @ {size_label(self.per_class)}/class, seed {self.seed}"


def size_label(per_class: int) -> str:
    return ALL if per_class == 0 else str(per_class)


def parse_arm(text: str) -> Arm:
    """``MODEL:MODE[:PRESET][:tuneN]`` -> Arm; unknown model, mode or preset -> UserError."""
    parts = text.strip().split(":")
    tune = re.fullmatch(r"tune(\d+)", parts[-1]) if len(parts) > 2 else None
    if tune:
        parts = parts[:-1]
    model, rest = (
        (f"timm:{parts[1]}", parts[2:])
        if parts[0] == "timm" and len(parts) > 1
        else (parts[0], parts[1:])
    )
    if not rest or rest[0] not in MODES or len(rest) > 2 or not model or model == "timm:":
        raise UserError(
            f"arm {text!r}: write MODEL:MODE[:PRESET] with MODE one of {', '.join(MODES)} "
            "(e.g. cnn:scratch, cnn:scratch:cnn-best, timm:tf_efficientnet_lite0:frozen)"
        )
    resolve_name(model)  # unknown model -> UserError naming the choices
    preset = rest[1] if len(rest) == 2 else ""
    if preset:
        resolve_preset(preset)
    try:
        ModelConfig(name=model, mode=rest[0])
    except UserError as e:
        raise UserError(f"arm {text!r}: {e}") from None
    n_trials = int(tune.group(1)) if tune else 0
    if tune and (n_trials < 1 or rest[0] not in ("frozen", "partial")):
        raise UserError(
            f"arm {text!r}: tuneN searches heads on cached features: N >= 1, with a frozen or "
            "partial arm (e.g. timm:tf_efficientnet_lite0:frozen:tune20)"
        )
    # the canonical spec: equal arms ("cnn:scratch", " cnn:scratch:") are one arm, one folder
    spec = ":".join(
        [model, rest[0], *([preset] if preset else []), *([f"tune{n_trials}"] * bool(tune))]
    )
    return Arm(spec=spec, model=model, mode=rest[0], preset=preset, tune=n_trials)


def parse_sizes(text: str) -> tuple[str, ...]:
    """``"4,16,64,all"`` or fractions ``"0.01,0.1,all"`` -> the size strings, checked."""
    sizes = tuple(s.strip() for s in text.split(",") if s.strip())
    if not sizes:
        raise UserError("--per-class is empty; give sizes like 4,16,64,all")
    for s in sizes:
        if s == ALL:
            continue
        try:
            value = float(s)
        except ValueError:
            raise UserError(
                f"--per-class {s!r}: give a count (16), a fraction (0.1) or 'all'"
            ) from None
        if value <= 0 or (value >= 1 and not value.is_integer()) or (value < 1 and "." not in s):
            raise UserError(
                f"--per-class {s!r}: a count must be a positive integer, a fraction in (0, 1)"
            )
    return sizes


def make_grid(
    arms: list[str],
    sizes: str,
    seeds: int,
    overrides: dict | None = None,
    min_steps: int = DEFAULT_MIN_STEPS,
    patience: int = DEFAULT_PATIENCE,
) -> Grid:
    """Parse and check everything that does not need the data."""
    parsed = tuple(parse_arm(a) for a in arms if a.strip())
    if not parsed:
        raise UserError(
            "the study has no arms; give --arms like cnn:scratch,timm:tf_efficientnet_lite0:frozen"
        )
    if len({a.spec for a in parsed}) != len(parsed):
        given = ", ".join(a.strip() for a in arms if a.strip())
        raise UserError(
            f"--arms lists an arm twice (perhaps written two ways): {given} are "
            f"{', '.join(a.spec for a in parsed)}"
        )
    by_key: dict[str, str] = {}
    for a in parsed:
        if by_key.setdefault(a.key.lower(), a.spec) != a.spec:  # a case-insensitive file system
            raise UserError(
                f"arms {by_key[a.key.lower()]!r} and {a.spec!r} would share the folder {a.key}; "
                "rename one preset file"
            )
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1; got {seeds}")
    if min_steps < 0 or patience < 1:
        raise UserError(
            f"--min-steps must be >= 0 and --patience-epochs >= 1; got {min_steps}, {patience}"
        )
    return Grid(parsed, parse_sizes(sizes), seeds, overrides or {}, min_steps, patience)


def resolve_sizes(sizes: tuple[str, ...], class_counts: dict[int, int]) -> tuple[int, ...]:
    """Size strings -> images per class (0 = all), ascending, deduplicated, checked vs the data."""
    smallest_class = min(class_counts, key=lambda c: (class_counts[c], c))
    smallest = class_counts[smallest_class]
    out = set()
    for s in sizes:
        if s == ALL:
            out.add(0)
            continue
        value = float(s)
        k = int(value) if value >= 1 else max(1, int(value * smallest))
        if k > smallest:
            raise UserError(
                f"--per-class {s} is larger than class {smallest_class}, which has {smallest} "
                f"training images; use at most {smallest} (or 'all')"
            )
        out.add(k)
    return tuple(sorted(out, key=lambda k: (k == 0, k)))


def _arm_base(arm: Arm, grid: Grid) -> dict[str, Any]:
    base = load_yaml(resolve_preset(arm.preset)) if arm.preset else {}
    tune = {"optim": {"tune": arm.tune}} if arm.tune else {}
    return merge_dicts(merge_dicts(base, grid.overrides), tune)


def cell_config(
    grid: Grid, arm: Arm, per_class: int, seed: int, run_dir: Path, n_train: int
) -> Config:
    """Preset < the study's flags < the cell's own fields, then the min-steps protocol."""
    d = merge_dicts(
        _arm_base(arm, grid),
        {
            "model": {"name": arm.model, "mode": arm.mode},
            "data": {"per_class": per_class, "subset_seed": seed},
            # no per-cell report.md/html (15-20 s a cell on this CPU): the study report covers the
            # cells, and `transferlab report CELL_DIR` writes one on demand
            "run": {"seed": seed, "run_dir": str(run_dir), "report": False},
        },
    )
    cfg = only_where_features_are_cached(config_from_dict(d))
    return apply_protocol(cfg, n_train, grid.min_steps, grid.patience)


def apply_protocol(cfg: Config, n_train: int, min_steps: int, patience: int) -> Config:
    """Raise the epochs to give at least ``min_steps`` steps; early-stop raised unscheduled
    cells."""
    if cfg.model.solver == "lbfgs":
        return cfg  # a full-batch probe has no steps to count
    o = cfg.optim
    steps_per_epoch = max(1, math.ceil(n_train / o.batch_size))
    epochs = max(o.epochs, math.ceil(min_steps / steps_per_epoch))
    if epochs == o.epochs:
        return cfg
    stretch = epochs / o.epochs
    optim = dataclasses.replace(
        o,
        epochs=epochs,
        warmup_epochs=o.warmup_epochs * stretch,
        patience=o.patience or (patience if o.schedule == "none" else 0),
    )
    return dataclasses.replace(cfg, optim=optim)


def plan_cells(grid: Grid, class_counts: dict[int, int], study_dir: Path) -> list[Cell]:
    """Every cell, seed by seed, then arm by arm, then sizes ascending.

    Seed-major order: a study stopped early holds whole curves (every arm and size) for its first
    seeds. A frozen arm's splits are extracted once, before its cells run (studies.runner); in
    a grid without ``all`` only the training rows of its subsets are (``data.extract_per_class``).
    """
    sizes = resolve_sizes(grid.sizes, class_counts)
    n_all = sum(class_counts.values())
    cells = []
    for seed in range(grid.seeds):
        for arm in grid.arms:
            for k in sizes:
                n = k * len(class_counts) if k else n_all
                run_dir = study_dir / arm.key / f"pc{size_label(k)}-s{seed}"
                cfg = cell_config(grid, arm, k, seed, run_dir, n)
                if uses_feature_cache(cfg) and not _long_tail(cfg):
                    # a grid with "all" extracts every row once and its cells pick theirs; a
                    # grid without it, only the rows its cells use (the subsets are nested: the
                    # largest size's of every seed)
                    rows = (0, 1) if 0 in sizes else (max(sizes), grid.seeds)
                    data = dataclasses.replace(
                        cfg.data, extract_per_class=rows[0], extract_seeds=rows[1]
                    )
                    cfg = dataclasses.replace(cfg, data=data)
                cells.append(Cell(arm, k, seed, run_dir, cfg, n))
    if not cells:
        raise UserError("the study grid is empty; give --arms, --per-class and --seeds")
    return cells


def _long_tail(cfg: Config) -> bool:
    """A long-tail split picks its training rows from the whole split's features."""
    return cfg.data.dataset.startswith("cifar100-lt:")


def data_fields(cfg: Config) -> tuple:
    """The config fields that decide which dataset load_data returns."""
    d = cfg.data
    return (
        d.dataset,
        d.data_dir,
        d.download,
        d.split_seed,
        d.val_size,
        d.val_frac,
        d.test_frac,
        d.train_subset,
        d.test_subset,
    )
