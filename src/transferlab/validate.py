"""Checks that need only the config, the model's name and the environment, run before any data
loads.

Every check here raises :class:`~transferlab.errors.UserError` (exit code 2) with a message that
says what to do. ``check_before_data`` is called once per run, right after the config is
resolved and before the data set is read, so a bad flag never costs a data load.

Usage:
    check_before_data(cfg, env)
"""

from __future__ import annotations

import timm
import torch

from transferlab import rundir
from transferlab.config import Config
from transferlab.distributed import DistEnv
from transferlab.errors import UserError
from transferlab.features.cache import cache_root
from transferlab.features.engines import require_engine
from transferlab.features.quantize import require_int8
from transferlab.metrics import load_tensorboard
from transferlab.models.partial import check_stages
from transferlab.models.registry import SOURCES, check_drop_path, resolve_name
from transferlab.plan import uses_feature_cache
from transferlab.precision import resolve_precision
from transferlab.report.mlflow_log import check_tracking_available
from transferlab.threads import usable_cores
from transferlab.training.tune import load_optuna, open_storage


def check_before_data(cfg: Config, env: DistEnv) -> None:
    """All config-only checks, in one place."""
    check_model(cfg, env)
    check_ranges(cfg)
    check_paths(cfg)
    check_extras(cfg)
    check_feature_precision(cfg)
    n_train = expected_train_images(cfg)
    if n_train is not None:
        check_batch_size(cfg.optim.batch_size, n_train, env.world_size)


def check_model(cfg: Config, env: DistEnv) -> None:
    """The model exists, takes the flags given, and the device can run what is asked."""
    source, arch = resolve_name(cfg.model.name)  # an unknown name lists the choices
    resolve_precision(cfg.run.precision, env.device)  # fp16 on a CPU
    size = SOURCES[source].input_size
    if size and cfg.data.image_size not in (0, size):
        raise UserError(
            f"--image-size {cfg.data.image_size}: the {source} takes {size} px inputs only"
        )
    if cfg.model.solver == "lbfgs" and env.enabled:
        raise UserError(
            "--solver lbfgs is a single-process, full-batch fit; run it without torchrun"
        )
    if cfg.optim.tune and env.enabled:
        raise UserError("--tune searches in one process; run it without torchrun")
    if cfg.model.sync_bn and env.device.type != "cuda":
        raise UserError(
            "--sync-bn needs CUDA GPUs (SyncBatchNorm does not run on the CPU); drop --sync-bn"
        )
    if cfg.model.mode == "partial":
        _check_stages(source, arch, cfg.model.name, cfg.model.train_stages)
    if cfg.model.feature_layers:
        _check_stages(source, arch, cfg.model.name, cfg.model.feature_layers, "--feature-layers")
    if cfg.model.drop_path:
        check_drop_path(cfg.model.name)


def _check_stages(source: str, arch: str, name: str, k: int, flag: str = "--train-stages") -> None:
    """--mode partial or --feature-layers: the backbone has stages this tool knows and ``k`` fits
    them (a timm model is built on the meta device: no memory, no weights)."""
    net = torch.nn.Identity()  # no stages: check_stages names the supported models
    if source == "timm":
        with torch.device("meta"):
            net = timm.create_model(arch, pretrained=False, num_classes=0)
    check_stages(net, name, k, flag)


def check_extras(cfg: Config) -> None:
    """Optional extras the config asks for are installed (one line naming the extra)."""
    if cfg.run.tensorboard:
        load_tensorboard()
    if cfg.run.track:
        check_tracking_available(cfg.run.track)
    if cfg.optim.tune:
        load_optuna()
        if cfg.optim.tune_storage:  # unreachable: say so before any data loads
            open_storage(cfg.optim.tune_storage)
    if cfg.run.engine != "auto":
        require_engine(cfg.run.engine)
    if cfg.run.feature_precision == "int8":
        require_int8()


def check_feature_precision(cfg: Config) -> None:
    """``--feature-precision`` sets the extraction of cached frozen features: elsewhere it would
    be ignored, so it is an error."""
    if cfg.run.feature_precision == "int8" and cfg.model.mode != "frozen":
        raise UserError(
            f"--feature-precision int8 quantises a frozen backbone (--mode frozen); --mode "
            f"{cfg.model.mode} trains on other features: drop the flag"
        )
    if cfg.run.feature_precision != "auto" and not uses_feature_cache(cfg):
        raise UserError(
            f"--feature-precision {cfg.run.feature_precision} sets how cached frozen features "
            "are extracted; this run has none (it needs --mode frozen with the feature cache "
            "and no per-batch augmentation); drop the flag or use --precision"
        )


# ---------------------------------------------------------------------------------------------
# Ranges, paths and the torchrun environment (issue 16). ``check_dist_env`` runs in cli.main
# before anything else; the others are called from check_before_data (and check_batch_size
# once a folder data set's size is known).

SEED_MAX = 2**32 - 1  # numpy's seed range; torch takes more, but one range for every seed
MAX_IMAGE_SIZE = 1024  # px; see check_ranges for why
MAX_NUM_WORKERS = 64  # DataLoader processes: each holds a copy of the decode pipeline
CIFAR_TRAIN_IMAGES = 50_000  # images in CIFAR-100's training file (train + val)
_DIST_INTS = {
    "RANK": 0,
    "LOCAL_RANK": 0,
    "WORLD_SIZE": 1,
    "LOCAL_WORLD_SIZE": 1,
    "GROUP_RANK": 0,
    "NODE_RANK": 0,
    "MASTER_PORT": 1,
}


def check_dist_env(environ) -> None:
    """torchrun's variables, if set, are integers in range (RANK < WORLD_SIZE, a valid port)."""
    values: dict[str, int] = {}
    for name, low in _DIST_INTS.items():
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            values[name] = int(raw.strip())
        except ValueError:
            values[name] = low - 1
        if values[name] < low:
            raise UserError(
                f"environment variable {name}={raw!r} must be an integer >= {low}; "
                "it is set by torchrun: unset it, or start the job with torchrun "
                "--nproc-per-node N"
            )
    if values.get("MASTER_PORT", 1) > 65535:
        raise UserError(f"MASTER_PORT={environ['MASTER_PORT']!r} is not a TCP port (1-65535)")
    pairs = (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    for rank, size in pairs:
        if rank in values and size in values and values[rank] >= values[size]:
            raise UserError(
                f"{rank}={values[rank]} must be below {size}={values[size]}; start "
                "the job with torchrun, or unset these variables"
            )
    if "MASTER_ADDR" in environ and not environ["MASTER_ADDR"].strip():
        raise UserError("MASTER_ADDR is set but empty; unset it or give the rank-0 host name")


def check_ranges(cfg: Config) -> None:
    """Seeds within 0..2**32-1, image size within reason, worker counts within reason."""
    for flag, value in (
        ("--seed", cfg.run.seed),
        ("--split-seed", cfg.data.split_seed),
        ("--subset-seed", cfg.data.subset_seed),
    ):
        if not 0 <= value <= SEED_MAX:
            raise UserError(f"{flag} {value} is out of range; seeds are 0..{SEED_MAX} (2**32 - 1)")
    if cfg.data.image_size > MAX_IMAGE_SIZE:
        raise UserError(
            f"--image-size {cfg.data.image_size} is above {MAX_IMAGE_SIZE} px: "
            "pretrained backbones were trained at 224-384 px, and memory and time grow "
            f"with the square of the side ({MAX_IMAGE_SIZE} px costs 21x 224 px per "
            f"image); use {MAX_IMAGE_SIZE} or less"
        )
    side = cfg.data.image_size or (32 if cfg.model.name == "cnn" else MAX_IMAGE_SIZE)
    for flag, value in (("--crop-padding", cfg.data.crop_padding), ("--cutout", cfg.data.cutout)):
        if value > side:
            raise UserError(
                f"{flag} {value} is larger than the {side} px input side; use a few px "
                "(4 is usual at 32 px)"
            )
    if cfg.data.num_workers > MAX_NUM_WORKERS:
        raise UserError(
            f"--num-workers {cfg.data.num_workers} is above {MAX_NUM_WORKERS}; each "
            "worker is a process with its own memory: use about the number of CPU "
            "cores"
        )
    cores = usable_cores()
    if cfg.run.threads > cores:
        raise UserError(
            f"--threads {cfg.run.threads} is more than the {cores} cores this process may run on; "
            f"use 1-{cores}, or 0 to take the cores other processes leave free"
        )
    if cfg.data.dataset == "cifar100" and cfg.data.val_size >= CIFAR_TRAIN_IMAGES:
        raise UserError(
            f"--val-size {cfg.data.val_size} leaves no CIFAR-100 training images "
            f"(there are {CIFAR_TRAIN_IMAGES}); use e.g. 5000"
        )


def expected_train_images(cfg: Config) -> int | None:
    """Training images the run will see, when known before the data loads (CIFAR); else None."""
    if cfg.data.dataset != "cifar100":
        return None
    n = CIFAR_TRAIN_IMAGES - cfg.data.val_size
    if cfg.data.train_subset:
        n = min(n, cfg.data.train_subset)
    return n


def check_batch_size(batch_size: int, n_train: int, world_size: int = 1) -> None:
    """A global batch larger than the training set is a mistake (and may not fit in memory)."""
    if batch_size > n_train:
        raise UserError(
            f"--batch-size {batch_size} is larger than the {n_train} training "
            f"images; use at most {n_train} (or more data)"
        )
    if n_train < world_size:
        raise UserError(f"{n_train} training images cannot be split over {world_size} processes")


def check_paths(cfg: Config) -> None:
    """``folder:`` has a path, ``~user`` resolves, and run/cache dirs stay out of the data root."""
    if cfg.data.dataset.startswith("folder:") and not cfg.data.dataset[len("folder:") :].strip():
        raise UserError("--data folder: needs a path, e.g. --data folder:/data/flowers")
    root = rundir.data_root(cfg.data.dataset, cfg.data.data_dir)
    run_dir = rundir.expand_user(cfg.run.run_dir or "runs", "--run-dir")
    cache = cache_root(cfg.run.cache_dir)  # UserError for an unknown ~user
    if root is None:
        return
    rundir.refuse_inside(run_dir, root, "run dir")
    if cfg.model.mode in ("frozen", "partial") and cfg.run.feature_cache:
        rundir.refuse_inside(cache, root, "cache dir")
