"""``transferlab compare``: the seed study's three experiments, and report.md.

1. the seed CNN from scratch for ``--epochs`` (10);
2. a frozen pretrained backbone (ResNet-18) with the seed's head for ``--epochs`` (through the
   feature cache unless ``--no-feature-cache``);
3. the CNN again, until it reaches experiment 2's best validation accuracy, patience 5.
Optionally (``--with-cnn-best``) the CNN with the tuned ``cnn-best`` preset.

Experiment 3 with the same seed repeats experiment 1's epochs bit for bit before it goes on,
so it continues from experiment 1's last checkpoint through the exact resume (the report says
so) whenever that is the same computation: a constant learning rate (the seed's schedule) and
no stop that experiment 1's own validation curve would already have triggered.
``--independent-chase`` runs it from scratch with ``--chase-seed`` instead: an independent
replicate, the informative kind.

The data are loaded once and shared. Each experiment is an ordinary run dir inside
``--run-dir``; the report is rebuilt from those files alone (``transferlab report``).

Usage:
    transferlab compare --data-dir ../shared/datasets --epochs 10
"""

from __future__ import annotations

import copy
import csv
import hashlib
import logging
import shutil
from datetime import datetime
from pathlib import Path

from transferlab.config import (
    CompareConfig,
    Config,
    config_from_dict,
    config_to_dict,
    load_yaml,
    merge_dicts,
    resolve_preset,
)
from transferlab.data.load import load_data
from transferlab.distributed import init_distributed
from transferlab.errors import UserError
from transferlab.experiment import run_experiment
from transferlab.io import write_atomic, write_json, write_torch
from transferlab.models.registry import resolve_name
from transferlab.plan import (
    Plan,
    only_where_features_are_cached,
    resolved_config_dict,
    resolved_config_text,
)
from transferlab.report.compare_report import write_compare_report
from transferlab.rundir import RunDir, make_output_dir
from transferlab.training.checkpoint import RESUME_KEYS, load_checkpoint

log = logging.getLogger(__name__)


def _variant(base: Config, root: Path, dir_name: str, name: str, mode: str) -> Config:
    d = config_to_dict(copy.deepcopy(base))
    d["model"].update(name=name, mode=mode)
    if name == "cnn":  # --image-size is the backbone's; the cnn always takes 32 px
        d["data"]["image_size"] = 0
    d["run"]["run_dir"] = str(root / dir_name)
    return only_where_features_are_cached(config_from_dict(d))


def experiment_configs(
    base: Config, cc: CompareConfig, root: Path, chase_target: float | None = None
) -> dict[str, Config]:
    """The configs of the compare experiments (chase needs experiment 2's best val acc)."""
    out = {
        "cnn": _variant(base, root, "cnn", "cnn", "scratch"),
        "frozen": _variant(
            base, root, f"{cc.backbone.replace(':', '-')}-frozen", cc.backbone, "frozen"
        ),
    }
    if chase_target is not None:
        c = _variant(base, root, "cnn-chase", "cnn", "scratch")
        c.optim.epochs = cc.chase_max_epochs
        c.optim.patience = cc.chase_patience
        c.optim.target_val_acc = round(chase_target, 6)
        if cc.independent_chase:
            c.run.seed = cc.chase_seed
        out["chase"] = c
    return out


def _val_accs(run_dir: Path) -> list[float]:
    with open(RunDir(run_dir).metrics, newline="") as f:
        return [float(r["val_acc"]) for r in csv.DictReader(f)]


def chase_can_continue(first: Config, chase: Config, first_dir: Path) -> bool:
    """True when the chase's first epochs are exactly experiment 1's (same data, seed, model,
    recipe; a constant lr) and experiment 1's curve would not have stopped the chase already."""
    a, b = config_to_dict(first), config_to_dict(chase)
    for d in (a, b):
        d["optim"].update(epochs=0, patience=0, target_val_acc=0.0)
        d["run"]["run_dir"] = ""
    if a != b or chase.optim.schedule != "none" or not RunDir(first_dir).last.is_file():
        return False
    best, bad = -1.0, 0
    for acc in _val_accs(first_dir):  # replay the chase's stopping rules on experiment 1's curve
        best, bad = (acc, 0) if acc > best else (best, bad + 1)
        if best >= chase.optim.target_val_acc or bad >= chase.optim.patience:
            return False
    return True


def continue_from(first_dir: Path, chase: Config) -> None:
    """Make the chase dir a resumable copy of experiment 1 under the chase's config."""
    first, dst = RunDir(first_dir), RunDir(chase.run.run_dir)
    dst.path.mkdir(parents=True, exist_ok=True)
    text = ""
    for name in (RunDir.LAST, RunDir.BEST):
        ck = load_checkpoint(first / name, require=RESUME_KEYS)
        plan = Plan.from_dict(ck["plan"])
        text = resolved_config_text(chase, plan)
        ck["config"] = {
            k: v for k, v in resolved_config_dict(chase, plan).items() if k != "resolved"
        }
        ck["config_hash"] = hashlib.sha256(text.encode()).hexdigest()
        ck["fit_state"]["stop_reason"] = ""
        write_torch(dst / name, ck)
        del ck
    write_atomic(dst.config, text)
    for name in (RunDir.METRICS, RunDir.MODEL_SUMMARY):
        shutil.copyfile(first / name, dst / name)
    write_json(dst.continued_from, {"run_dir": str(first_dir)}, indent=None)


def _cnn_best(base: Config, root: Path) -> Config:
    d = merge_dicts(config_to_dict(base), load_yaml(resolve_preset("cnn-best")))
    d["run"]["run_dir"] = str(root / "cnn-best")
    d["data"]["image_size"] = 0
    d["model"].update(name="cnn", mode="scratch")
    return only_where_features_are_cached(config_from_dict(d))


def _prepare_root(base: Config, cc: CompareConfig) -> Path:
    root = Path(cc.run_dir or f"runs/compare-{datetime.now():%Y%m%d-%H%M%S}")
    if root.exists() and any(root.iterdir()) and not base.run.overwrite:
        raise UserError(f"compare dir {root} is not empty; pass --overwrite or another --run-dir")
    resolve_name(cc.backbone)  # an unknown backbone fails now, not after the CNN has trained
    return make_output_dir(root, "--run-dir")


def run_compare(base: Config, cc: CompareConfig, stop_requested=lambda: False) -> dict:
    """Run the experiments, then write report.md (and report.html)."""
    env = init_distributed(base.run.device)
    root = _prepare_root(base, cc)
    data = load_data(base)
    summaries = {}
    cfgs = experiment_configs(base, cc, root)
    for key in ("cnn", "frozen"):
        log.info("compare: experiment %s -> %s", key, cfgs[key].run.run_dir)
        summaries[key] = run_experiment(
            cfgs[key], dataset=data, env=env, stop_requested=stop_requested
        )
    target = summaries["frozen"].fit_state["best_val_acc"]
    chase = experiment_configs(base, cc, root, chase_target=target)["chase"]
    first = Path(cfgs["cnn"].run.run_dir)
    resume = env.is_main and not env.enabled and chase_can_continue(cfgs["cnn"], chase, first)
    if resume:
        log.info(
            "compare: experiment chase continues experiment 1's checkpoint (its first %d "
            "epochs are the same computation)",
            len(_val_accs(first)),
        )
        continue_from(first, chase)
    log.info("compare: experiment chase (target val acc %.4f) -> %s", target, chase.run.run_dir)
    summaries["chase"] = run_experiment(
        chase, resume=resume, dataset=data, env=env, stop_requested=stop_requested
    )
    if cc.with_cnn_best:
        summaries["cnn_best"] = run_experiment(
            _cnn_best(base, root), dataset=data, env=env, stop_requested=stop_requested
        )
    if env.is_main:
        path = write_compare_report(root)
        log.info("compare report: %s", path)
    return summaries
