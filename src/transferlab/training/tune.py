"""Head search on cached features (``--tune N``): Optuna's TPE sampler with median pruning.

Cached features make a head a few seconds of training, so a search of N trials costs minutes.
Each trial trains a fresh head (seeded like the run's own) on the run's training loader and is
scored by its best validation accuracy; the test split is never read until the final run. The
searched values: lr, weight decay, hidden width (0 = a linear head), dropout, label smoothing
and epochs. The best trial's values then become the run's config (``config.yaml`` holds them
with ``tune: 0``, so ``--preset RUN/config.yaml`` reruns the best head without a search), and
the run trains that head as usual.

Storage: Optuna's SQLite file ``RUN/tune.db`` by default. The search starts after the run's
first checkpoint, so ``transferlab train --resume RUN`` of a killed search continues it: the
finished trials are kept and only the missing ones run. ``--tune-storage URL`` (any Optuna RDB
URL: ``sqlite:////shared/tune.db``, ``postgresql://...``) shares one study among several
machines: each asks the storage for its next trial, and N counts the trials of all of them.
The study name (``--tune-study``) defaults to a hash of the config without the searched fields,
so the same command on two machines joins the same study.

Usage:
    job, state, opt = search_and_apply(job)      # in experiment._run, before fit
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from typing import Any

import torch

from transferlab.config import Config, config_to_dict
from transferlab.distributed import wrap_ddp
from transferlab.errors import TrainingStopped, UserError
from transferlab.io import write_json
from transferlab.models.classifier import make_head
from transferlab.models.partial import PartialTrainer
from transferlab.rundir import RunDir
from transferlab.training.fit import FitState, Job, enter_phase, selection_score
from transferlab.training.loop import OptimParts, StepGuard, evaluate, train_one_epoch

log = logging.getLogger(__name__)

HIDDEN_CHOICES = (0, 256, 512, 1024)  # head widths searched; 0 = a linear head
# what a trial may change, per config section (everything else is the study's identity)
SEARCHED = {
    "optim": ("lr", "weight_decay", "label_smoothing", "epochs"),
    "model": ("head", "head_hidden", "head_dropout"),
}
# settings that do not change a trial's result (where it runs, what it writes)
NOT_IDENTITY = {
    "optim": ("tune", "tune_storage", "tune_study"),
    "run": ("run_dir", "overwrite", "progress", "device", "tensorboard", "track", "report"),
}


def load_optuna():
    """The optional ``optuna`` package (the ``tune`` extra), or a one-line UserError."""
    try:
        import optuna
    except ImportError:
        raise UserError("--tune needs Optuna: pip install 'transferlab[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    return optuna


def open_storage(url: str, attempts: int = 3):
    """An Optuna RDB storage at ``url``; an unreachable or malformed one is a UserError.

    Two searches that open a new storage at once race to create its tables (one of them gets
    an IntegrityError from the schema's version row): a failed open is retried after the other
    had a moment to finish.
    """
    optuna = load_optuna()
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    error: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(0.5 * attempt)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as e:  # sqlalchemy's errors (bad URL, no server, no driver) vary
            error = e
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    raise UserError(f"--tune-storage {url}: cannot open it ({first})") from None


def study_name(cfg: Config) -> str:
    """``--tune-study``, else a hash of the config without the searched and run-place fields."""
    if cfg.optim.tune_study:
        return cfg.optim.tune_study
    d = config_to_dict(cfg)
    for section, names in (*SEARCHED.items(), *NOT_IDENTITY.items()):
        for name in names:
            d[section].pop(name, None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return f"transferlab-{cfg.model.name.replace(':', '-')}-{hashlib.sha256(blob).hexdigest()[:12]}"


def suggest(trial, cfg: Config) -> dict[str, Any]:
    """One trial's values. Ranges: lr around the optimiser's usual scale (SGD 10x Adam's), the
    epochs from a quarter to twice the given ``--epochs`` (the budget sets the scale)."""
    lo, hi = (1e-3, 1e-1) if cfg.optim.optimizer == "sgd" else (1e-4, 1e-2)
    hidden = trial.suggest_categorical("head_hidden", HIDDEN_CHOICES)
    return {
        "lr": trial.suggest_float("lr", lo, hi, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
        "head_hidden": hidden,
        "head_dropout": trial.suggest_float("head_dropout", 0.0, 0.5),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "epochs": trial.suggest_int(
            "epochs", max(1, cfg.optim.epochs // 4), max(2, 2 * cfg.optim.epochs)
        ),
    }


def with_values(cfg: Config, values: dict[str, Any], keep_search: bool) -> Config:
    """``cfg`` with a trial's values; ``keep_search=False`` also turns the search off (the
    config a rerun of the best trial needs)."""
    optim = {k: values[k] for k in SEARCHED["optim"]}
    if not keep_search:
        optim.update(tune=0, tune_storage="", tune_study="")
    hidden = values["head_hidden"]
    model = {
        "head": "mlp" if hidden else "linear",
        "head_hidden": hidden or cfg.model.head_hidden,
        "head_dropout": values["head_dropout"],
    }
    return dataclasses.replace(
        cfg,
        optim=dataclasses.replace(cfg.optim, **optim),
        model=dataclasses.replace(cfg.model, **model),
    )


def apply_config(job: Job, cfg: Config) -> Job:
    """``job`` with ``cfg``'s head (freshly initialised from the run's seed, so a rerun of the
    best trial trains the same head) and loss settings."""
    m = cfg.model
    torch.manual_seed(cfg.run.seed)
    head = make_head(
        m.head, job.model.feature_dim, len(job.data.classes), m.head_hidden, m.head_dropout
    )
    job.model.head = head.to(job.env.device)
    module = job.model.head
    if isinstance(job.pipe.eval_module, PartialTrainer):  # partial: the last stages + the head
        module = job.pipe.eval_module
        module.head = job.model.head
    job.pipe.train_module = wrap_ddp(module, job.env)
    job.pipe.eval_module = module
    ctx = dataclasses.replace(job.ctx, label_smoothing=cfg.optim.label_smoothing)
    return dataclasses.replace(job, cfg=cfg, ctx=ctx)


def _train_trial(job: Job, trial, optuna) -> float:
    """Train one trial's head; its best val score (``--select-by``: accuracy by default),
    reported per epoch for pruning."""
    opt: OptimParts = enter_phase(job, "main")
    guard = StepGuard(job.ctx)
    torch.manual_seed(job.cfg.run.seed)  # the final run of the best trial starts from this too
    best = 0.0
    for epoch in range(job.cfg.optim.epochs):
        job.pipe.train_module.train()
        job.pipe.train_loader.set_epoch(epoch)
        stats = train_one_epoch(
            job.pipe.train_forward, job.pipe.train_loader, opt, job.ctx, guard, desc="trial"
        )
        if stats.interrupted:
            raise TrainingStopped(
                f"search interrupted in trial {trial.number}; finished trials are kept in the "
                f"storage. Continue with: transferlab train --resume {job.run_dir}",
                exit_code=getattr(job.ctx.stop_requested, "exit_code", 130),
            )
        job.pipe.train_module.eval()
        val = evaluate(
            job.pipe.eval_forward, job.pipe.val_loader, job.ctx, num_classes=len(job.data.classes)
        )
        score = selection_score(job.cfg.optim.select_by, val.acc, val.balanced_acc)
        best = max(best, score)
        trial.report(score, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return best


def run_search(job: Job) -> tuple[dict[str, Any], float, str, int]:
    """Run (or continue) the search: (best values, best val acc, study name, finished trials)."""
    optuna = load_optuna()
    cfg = job.cfg
    shared = bool(cfg.optim.tune_storage)
    url = cfg.optim.tune_storage or f"sqlite:///{RunDir(job.run_dir).tune_db}"
    name = study_name(cfg)
    study = optuna.create_study(
        study_name=name,
        storage=open_storage(url),
        direction="maximize",
        # a shared study: each worker samples its own startup points (a common seed would
        # make every machine try the same ones); a local one is reproducible from --seed
        sampler=optuna.samplers.TPESampler(seed=None if shared else cfg.run.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        load_if_exists=True,
    )
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    quiet = dataclasses.replace(job, ctx=dataclasses.replace(job.ctx, progress=False))
    # partial mode trains backbone stages too: every trial (and the final run) starts from these
    pretrained = {k: v.clone() for k, v in job.model.backbone.state_dict().items()}

    def objective(trial) -> float:
        values = suggest(trial, cfg)
        job.model.backbone.load_state_dict(pretrained)
        tjob = apply_config(quiet, with_values(cfg, values, keep_search=True))
        try:
            score = _train_trial(tjob, trial, optuna)
        except TrainingStopped:
            if job.ctx.stop_requested():
                raise
            log.info("trial %d diverged (non-finite loss): scored 0", trial.number)
            return 0.0
        log.info("trial %d: val acc %.4f  %s", trial.number, score, _short(values))
        return score

    done = len(study.get_trials(deepcopy=False, states=finished))
    if done:
        log.info("search %s: %d of %d trials already done in %s", name, done, cfg.optim.tune, url)
    try:
        study.optimize(
            objective,
            n_trials=max(0, cfg.optim.tune - done),
            callbacks=[optuna.study.MaxTrialsCallback(cfg.optim.tune, states=finished)],
        )
    finally:
        job.model.backbone.load_state_dict(pretrained)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise TrainingStopped(f"search {name}: no trial completed; check the data and --lr range")
    best = max(complete, key=lambda t: (t.value, -t.number))
    n = len(study.get_trials(deepcopy=False, states=finished))
    return dict(best.params), float(best.value), name, n


def _short(values: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
        for k, v in values.items()
    )


def search_and_apply(job: Job) -> tuple[Job, FitState, OptimParts]:
    """The search, then the run set up to train its best trial from the start.

    Returns the job with the best config (search off), a fresh state and its optimiser, and
    writes ``tune.json`` (rank 0). The caller rewrites config.yaml and last.pt with them, so a
    resume from there trains the best head and ``--preset RUN/config.yaml`` reruns it.
    """
    values, score, name, n = run_search(job)
    log.info("search %s: best of %d trials val acc %.4f  %s", name, n, score, _short(values))
    job = apply_config(job, with_values(job.cfg, values, keep_search=False))
    state = FitState()
    opt = enter_phase(job, state.phase)
    if job.env.is_main:
        result = {
            "study": name,
            "storage": job.cfg.optim.tune_storage or RunDir.TUNE_DB,
            "trials": n,
            "best_val_score": score,  # --select-by of the best trial
            "best": values,
        }
        write_json(RunDir(job.run_dir).tune, result)
    return job, state, opt
