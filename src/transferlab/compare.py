"""``transferlab compare``: the seed study's three experiments, and report.md.

1. the seed CNN from scratch for ``--epochs`` (10);
2. a frozen pretrained backbone (ResNet-18) with the seed's head for ``--epochs`` (through the
   feature cache unless ``--no-feature-cache``);
3. the CNN again, until it reaches experiment 2's best validation accuracy, patience 5.
Optionally (``--with-cnn-best``) the CNN with the tuned ``cnn-best`` preset.

The data are loaded once and shared. Each experiment is an ordinary run dir inside
``--run-dir``; the report is rebuilt from those files alone (``transferlab report``).

Usage:
    transferlab compare --data-dir ../shared/datasets --epochs 10
"""

from __future__ import annotations

import copy
import logging
from datetime import datetime
from pathlib import Path

from transferlab.config import Config, config_from_dict, config_to_dict, load_yaml, merge_dicts
from transferlab.distributed import init_distributed
from transferlab.errors import UserError

log = logging.getLogger(__name__)


def experiment_configs(base: Config, args, root: Path, chase_target: float | None = None) -> dict[str, Config]:
    """The configs of the compare experiments (chase needs experiment 2's best val acc)."""
    def variant(dir_name: str, /, **model) -> Config:  # model holds name= and mode=
        d = config_to_dict(copy.deepcopy(base))
        d["model"].update(model)
        if model["name"] == "cnn":  # --image-size is the backbone's; the cnn always takes 32 px
            d["data"]["image_size"] = 0
        d["run"]["run_dir"] = str(root / dir_name)
        return config_from_dict(d)

    out = {"cnn": variant("cnn", name="cnn", mode="scratch")}
    out["frozen"] = variant(f"{args.backbone.replace(':', '-')}-frozen", name=args.backbone, mode="frozen")
    if chase_target is not None:
        c = variant("cnn-chase", name="cnn", mode="scratch")
        c.optim.epochs = args.chase_max_epochs
        c.optim.patience = args.chase_patience
        c.optim.target_val_acc = round(chase_target, 6)
        out["chase"] = c
    return out


def run_compare(base: Config, args, stop_requested=lambda: False) -> dict:
    """Run the experiments, then write report.md (and report.html where available)."""
    from transferlab.experiment import load_data, run_experiment
    from transferlab.report.compare_report import write_compare_report

    env = init_distributed(base.run.device)
    root = Path(args.run_dir or f"runs/compare-{datetime.now():%Y%m%d-%H%M%S}")
    if root.exists() and any(root.iterdir()) and not base.run.overwrite:
        raise UserError(f"compare dir {root} is not empty; pass --overwrite or another --run-dir")
    if args.chase_max_epochs < 1 or args.chase_patience < 1:
        raise UserError("--chase-max-epochs and --chase-patience must be >= 1")
    from transferlab.models.registry import resolve_name

    resolve_name(args.backbone)  # an unknown backbone fails now, not after the CNN has trained
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {root} ({e.strerror or e}); choose another --run-dir") from None
    data = load_data(base)
    summaries = {}
    cfgs = experiment_configs(base, args, root)
    for key in ("cnn", "frozen"):
        log.info("compare: experiment %s -> %s", key, cfgs[key].run.run_dir)
        summaries[key] = run_experiment(cfgs[key], dataset=data, env=env, stop_requested=stop_requested)
    target = summaries["frozen"]["fit_state"]["best_val_acc"]
    chase = experiment_configs(base, args, root, chase_target=target)["chase"]
    log.info("compare: experiment chase (target val acc %.4f) -> %s", target, chase.run.run_dir)
    summaries["chase"] = run_experiment(chase, dataset=data, env=env, stop_requested=stop_requested)
    if args.with_cnn_best:
        from transferlab.cli import resolve_preset

        d = merge_dicts(config_to_dict(base), load_yaml(resolve_preset("cnn-best")))
        d["run"]["run_dir"] = str(root / "cnn-best")
        d["data"]["image_size"] = 0
        best = config_from_dict(d)
        summaries["cnn_best"] = run_experiment(best, dataset=data, env=env, stop_requested=stop_requested)
    if env.is_main:
        path = write_compare_report(root)
        log.info("compare report: %s", path)
    return summaries
