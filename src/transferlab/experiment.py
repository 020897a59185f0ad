"""One experiment end to end: config -> plan -> pipeline -> fit -> test -> files.

1. open the run dir (or the checkpoint to resume) and run every config-only check;
2. load the data and build the model;
3. resolve the plan once (image size, preprocessing, precisions, engine, batches, path), or
   read it from the checkpoint on resume;
4. build the pipeline: cached features (``features/``) or pixels (``data/``);
5. fit (or the L-BFGS probe), restore the best weights, test, write the run's files.

Usage:
    summary = run_experiment(cfg)                       # a new run
    summary = run_experiment(cfg, resume=True)          # continue cfg.run.run_dir
"""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path

import torch

from transferlab.config import Config, config_from_dict
from transferlab.data.balance import class_counts, class_weights, suggest_balance
from transferlab.data.check import warn_test_leaks
from transferlab.data.cifar import ImageDataset
from transferlab.data.load import load_data
from transferlab.data.pipeline import build_pixel_pipeline
from transferlab.distributed import DistEnv, broadcast_object, init_distributed, run_checked
from transferlab.errors import TrainingStopped, UserError
from transferlab.features.pipeline import build_feature_pipeline, choose_extraction
from transferlab.features.probe import fit_linear_probe
from transferlab.models.registry import build_model
from transferlab.outputs import finish, write_run_header
from transferlab.pipeline import FeatureInfo, Pipeline
from transferlab.plan import Plan, resolve_plan, saved_plan, use_channels_last, uses_feature_cache
from transferlab.rundir import RunDir, check_config_unchanged, data_root, prepare_run_dir
from transferlab.threads import threads_restored, use_threads
from transferlab.training.checkpoint import RESUME_KEYS, load_checkpoint
from transferlab.training.fit import DataInfo, Job, fit, save_checkpoint, start_state
from transferlab.training.loop import StepContext
from transferlab.training.tune import search_and_apply
from transferlab.validate import check_before_data

log = logging.getLogger(__name__)


def _open_run(cfg: Config, resume: bool, env: DistEnv, epochs: int | None):
    """Lock the run dir (rank 0) and read the checkpoint to resume: (config, checkpoint, handle).

    The handle undoes an ``--overwrite`` until :meth:`commit` (after the first checkpoint).
    """
    d = cfg.data
    handle = run_checked(
        lambda: prepare_run_dir(
            cfg.run.run_dir or None,
            resume,
            cfg.run.overwrite,
            data_root=data_root(d.dataset, d.data_dir),
            stem=cfg.model.name,
            requested_epochs=epochs,
        ),
        env,
        main_only=True,
    )
    cfg.run.run_dir = broadcast_object(str(handle.run_dir) if env.is_main else None, env)
    run_dir = Path(cfg.run.run_dir)
    if not resume:
        return cfg, None, handle
    # every rank reads last.pt (multi-node: the run dir must be shared)
    ckpt = run_checked(lambda: load_checkpoint(RunDir(run_dir).last, require=RESUME_KEYS), env)
    if env.is_main:
        check_config_unchanged(run_dir, ckpt.get("config_hash"), ckpt["config"])
    try:
        saved = config_from_dict(ckpt["config"])
    except UserError as e:
        raise UserError(f"{RunDir(run_dir).last} holds an invalid config: {e}") from None
    saved.run.device, saved.run.progress = cfg.run.device, cfg.run.progress
    saved.run.run_dir = str(run_dir)  # the dir being resumed (a copied run writes to itself)
    if epochs is not None:  # --resume RUN --epochs N with a larger N extends a finished run
        saved.optim.epochs = max(saved.optim.epochs, epochs)
    return saved, ckpt, handle


def _plan(cfg: Config, model, ds: ImageDataset, env: DistEnv, ckpt: dict | None) -> Plan:
    """The run's plan: read back on resume, else resolved once (rank 0) and broadcast."""
    if ckpt is not None:
        return saved_plan(ckpt, env)
    extract = None
    if uses_feature_cache(cfg):  # the engine, precision and batch are measured first
        size = cfg.data.image_size or model.preprocess.input_size
        layout = use_channels_last(cfg.run.channels_last, size, env.device)
        extract = choose_extraction(cfg, model, ds, size, env, layout)
    in_memory = hasattr(ds.train, "images")
    return broadcast_object(resolve_plan(cfg, model, env, in_memory, extract), env)


def _pipeline(
    cfg: Config, plan: Plan, model, ds: ImageDataset, env: DistEnv, stop_requested
) -> Pipeline:
    if hasattr(ds, "set_preprocessing"):  # folder data: workers decode by the eval transform
        ds.set_preprocessing(plan.preprocessing)
    if plan.path == "features":
        return build_feature_pipeline(cfg, plan, model, ds, env, stop_requested)

    return build_pixel_pipeline(cfg, plan, model, ds, env)


def run_experiment(
    cfg: Config,
    resume: bool = False,
    dataset: ImageDataset | None = None,
    env: DistEnv | None = None,
    stop_requested=lambda: False,
    resume_epochs: int | None = None,
) -> dict:
    """Run (or resume) one experiment; returns the summary written to summary.json.

    ``resume_epochs``: a new epoch budget for a resumed run (``--resume RUN --epochs N``).
    A failure before the first checkpoint undoes the run dir (a new empty dir is removed); an
    ``--overwrite``'s old run is put back on any failure or stop before the new run's first
    epoch is on disk. The run dir stays locked while the run goes on.
    """
    t_start = time.perf_counter()
    env = env or init_distributed(cfg.run.device)
    check_before_data(cfg, env)
    cfg, ckpt, handle = _open_run(cfg, resume, env, resume_epochs if resume else None)
    try:
        with threads_restored():  # an in-process caller keeps its own torch thread count
            return _run(cfg, ckpt, handle, dataset, env, stop_requested, t_start)
    except TrainingStopped as e:
        if handle is None or handle.committed:
            raise
        handle.rollback()  # an --overwrite stopped in its first epoch: the old run is back
        # the reason stays, its "resume with ..." does not: the new run's files are gone
        why = re.split(r"[;.] (?:checkpoint saved|last\.pt|Resume|Continue|Free)", str(e))[0]
        raise TrainingStopped(
            f"{why}; the new run had not finished an epoch, so the previous run in "
            f"{handle.run_dir} is back as it was. Rerun the same command to replace it",
            exit_code=e.exit_code,
        ) from None
    except BaseException:
        if handle is not None:
            handle.rollback()  # a no-op once the run is committed
        raise
    finally:
        if handle is not None:
            handle.release()


def extract_features(cfg: Config, stop_requested=lambda: False) -> FeatureInfo:
    """Fill the feature cache with ``cfg``'s three splits and train nothing (no run dir).

    A study's extraction task: a frozen arm's splits are extracted once, before its cells start
    on any worker; its cells then read the cache.
    """
    env = init_distributed(cfg.run.device)
    check_before_data(cfg, env)
    if not uses_feature_cache(cfg):
        raise UserError(f"{cfg.model.name} in {cfg.model.mode} mode does not use the cache")
    ds = load_data(cfg)
    torch.manual_seed(cfg.run.seed)  # as a run does: --weights none draws the cells' backbone
    model = build_model(cfg.model, num_classes=len(ds.classes)).to(env.device)
    with threads_restored():
        use_threads(cfg.run.threads, "extract")
        plan = _plan(cfg, model, ds, env, None)
        return _pipeline(cfg, plan, model, ds, env, stop_requested).features


def _run(cfg: Config, ckpt, handle, dataset, env: DistEnv, stop_requested, t_start: float) -> dict:
    """The story of one run once its dir is ready."""
    check_before_data(cfg, env)  # a resumed run's own config, checked again
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    ds = dataset or run_checked(lambda: load_data(cfg), env)  # missing on one node: all say so
    if env.is_main and cfg.data.check_data and hasattr(ds.test, "paths") and ckpt is None:
        warn_test_leaks(ds)  # folder data: test files that are train files, one line
    model = build_model(cfg.model, num_classes=len(ds.classes)).to(env.device)
    # threads from the cores free now, per phase: extraction (with its engine probe), training
    use_threads(cfg.run.threads, "extract" if uses_feature_cache(cfg) else "train")
    plan = _plan(cfg, model, ds, env, ckpt)
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    t_setup = time.perf_counter()
    pipe = _pipeline(cfg, plan, model, ds, env, stop_requested)
    setup_s = time.perf_counter() - t_setup
    if plan.path == "features":
        use_threads(cfg.run.threads, "train")
    labels = getattr(pipe.train_loader, "labels", None)  # cached features: the picked rows
    labels = labels if labels is not None else ds.train.labels
    counts = class_counts(torch.as_tensor(labels), len(ds.classes))
    if env.is_main:
        suggest_balance(counts, list(ds.classes), cfg.optim.balance)
    weights = None
    if cfg.optim.balance == "weights":
        weights = class_weights(counts, cfg.optim.class_weights).to(env.device)
    ctx = StepContext(
        device=env.device,
        precision=plan.step_precision,
        env=env,
        label_smoothing=cfg.optim.label_smoothing,
        grad_clip=cfg.optim.grad_clip,
        nan_patience=cfg.run.nan_patience,
        class_weights=weights,
        progress=cfg.run.progress,
        stop_requested=stop_requested,
    )
    n_train = len(labels)
    data = DataInfo(
        classes=tuple(ds.classes),
        md5=ds.md5,
        split_seed=ds.split_seed,
        source=ds.source,
        folder=getattr(ds, "info", None),
        n_train=n_train,
    )
    commit = handle.commit if handle is not None else (lambda: None)
    job = Job(cfg, plan, model, pipe, ctx, env, Path(cfg.run.run_dir), data, commit)
    state, opt = start_state(job, ckpt)
    if ckpt is None:
        if env.is_main:
            write_run_header(job, ds)
        # a checkpoint before the first step: a run killed in its first epoch can be resumed.
        # An --overwrite's old run stays set aside until the first epoch is on disk (fit commits)
        run_checked(lambda: save_checkpoint(job, state, opt, RunDir.LAST), env, main_only=True)
        if handle is not None and handle.aside is None:
            handle.commit()
    if cfg.optim.tune and state.epoch == 0 and not state.partial:
        # the head search (resumed from its storage after a kill); then the best trial's config
        # is the run's: config.yaml and last.pt say so before its first epoch
        job, state, opt = search_and_apply(job)
        if env.is_main:
            write_run_header(job, ds)
        torch.manual_seed(cfg.run.seed)  # each trial trained from here: the best one runs again
        run_checked(lambda: save_checkpoint(job, state, opt, RunDir.LAST), env, main_only=True)
    if cfg.model.solver == "lbfgs":
        state = fit_linear_probe(job, state, opt)
    else:
        state = fit(job, state, opt)
    return finish(job, state, t_start, setup_s)
