"""``transferlab predict``: a trained run's top-k classes for your image files.

The model is rebuilt from the run's ``best.pt`` alone (config, class names, the resolved plan and
weights are all in the checkpoint). Each image goes through the plan's preprocessing as the run
evaluated: for folder data the weights' eval transform (RGB, shorter side resized to
floor(size / crop_pct), centre crop), for a CIFAR run the whole image resized to the input size
with no crop (``transferlab.data.folder.load_image``), then the weights' mean/std
(``to_float_normalized``).
Images are decoded and classified in batches of ``--batch-size``.

A file that cannot be read is reported (on stderr, or as an ``error`` line with ``--json``) and
the others still get predictions. Exit code: 0 when at least one file was predicted, 1 when
none was, 2 for bad input (no such run dir, no image found).

Usage:
    transferlab predict runs/lite0 photo.jpg more_photos/ --top-k 3
    transferlab predict runs/lite0 photos/ --json > predictions.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from transferlab.config import Config, config_from_dict
from transferlab.data.folder import IMAGE_EXTENSIONS, load_image
from transferlab.data.load import load_data
from transferlab.data.preprocess import to_float_normalized
from transferlab.distributed import resolve_device
from transferlab.errors import UserError
from transferlab.features import cache as fcache
from transferlab.features.engines import EngineChoice, engine_backbone_forward
from transferlab.features.pipeline import calibration_set
from transferlab.features.quantize import Calibration
from transferlab.models.classifier import Classifier
from transferlab.models.registry import build_model
from transferlab.plan import Plan, Preprocessing
from transferlab.rundir import RunDir
from transferlab.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class RunModel:
    """A trained model rebuilt from a run dir, with the run's resolved preprocessing."""

    model: Classifier
    classes: list[str]
    preprocessing: Preprocessing  # the plan's eval transform (resize, crop, mean, std)
    name: str  # --model of the run
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # logits; None = the model
    config: Config | None = None  # the run's config and plan (an int8 export reads its data)
    plan: Plan | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return (self.forward or self.model)(x)

    @property
    def image_size(self) -> int:  # input side in px the run trained at
        return self.preprocessing.crop

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std

    @property
    def interpolation(self) -> str:
        return self.preprocessing.interpolation


def load_run_model(run_dir: str | Path, device: torch.device | str = "cpu") -> RunModel:
    """Rebuild the best model of ``run_dir`` (weights from best.pt; no download, no pretrained
    load)."""
    run_dir = Path(run_dir)
    ckpt_path = RunDir(run_dir).best
    if not ckpt_path.is_file():
        raise UserError(
            f"{ckpt_path} not found: pass a finished run dir (one with {RunDir.BEST}), "
            "e.g. runs/<name>"
        )
    ck = load_checkpoint(ckpt_path, require=("model", "config", "classes", "plan"))
    try:
        cfg = config_from_dict(ck["config"])
        plan = Plan.from_dict(ck["plan"])
        classes = [str(c) for c in ck["classes"]]
        model = build_model(
            dataclasses.replace(cfg.model, weights="none"), num_classes=len(classes)
        )
        model.load_state_dict(ck["model"])
    except UserError as e:
        raise UserError(f"{ckpt_path} holds an invalid config: {e}") from None
    except (
        KeyError,
        TypeError,
        ValueError,
        RuntimeError,
    ) as e:  # loadable, but not this kind of checkpoint
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"{ckpt_path} is not a usable transferlab checkpoint ({type(e).__name__}: {first})"
        ) from None
    model.eval().to(device)
    # the plan's preprocessing as the run evaluated: the weights' eval transform for decoded
    # files, the whole-image resize (no crop) for a run on in-memory images (CIFAR); load_image
    forward = _engine_forward(model, plan, torch.device(device), cfg)
    return RunModel(model, classes, plan.preprocessing, cfg.model.name, forward, cfg, plan)


def _engine_forward(model: Classifier, plan: Plan, device: torch.device, cfg: Config):
    """On the CPU, a frozen-feature run's backbone runs on the engine (and precision) that
    extracted its training features, so predictions see the features the head was trained on.

    An int8 run predicts in int8: its quantised model comes from the cache (keyed by the
    calibration set the plan names), or is quantised again from the run's own training data."""
    ext = plan.extract
    if ext is None or device.type != "cpu":
        if ext is not None and ext.precision == "int8":
            raise UserError(
                "this run's features were extracted in int8 on the CPU (OpenVINO); predict "
                "with --device cpu so the head sees the features it was trained on"
            )
        return None
    calibration = None
    if ext.precision == "int8":
        calibration = Calibration(ext.calibration, lambda: _run_calibration(cfg, plan))
    features = engine_backbone_forward(
        EngineChoice(ext.engine, ext.precision, ext.batch_size),
        model.backbone,
        plan.image_size,
        fcache.cache_root(cfg.run.cache_dir),
        fcache.weights_hash(model.backbone),
        calibration,
    )
    return lambda x: model.head(features(x))


def _run_calibration(cfg: Config, plan: Plan):
    """The int8 calibration images of a run whose quantised model is not in the cache: drawn
    again from its own training data (a UserError when that data is gone or changed)."""
    log.info("the run's int8 model is not in the cache; quantising it again from its data")
    return calibration_set(cfg, plan, load_data(cfg)).batches()


def expand_inputs(items: list[str]) -> list[Path]:
    """Files as given, and the image files (by extension) under each folder, sorted."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                log.warning("no image files (%s) under %s", ", ".join(IMAGE_EXTENSIONS), p)
            out += found
        else:
            out.append(p)  # a missing or bad file is reported per file, not fatal
    if not out:
        raise UserError("no images to predict: pass image files or folders that contain them")
    return out


@torch.inference_mode()
def predict_files(
    rm: RunModel, files: list[Path], top_k: int, batch_size: int, device: torch.device
) -> list[dict]:
    """One dict per file, in order: {"file", "top": [{"class", "prob"}, ...]} or
    {"file", "error"}."""
    k = max(1, min(top_k, len(rm.classes)))
    results: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images, ok = [], []
        rows = [{"file": str(f)} for f in chunk]
        for row, f in zip(rows, chunk, strict=True):
            try:
                images.append(load_image(f, rm.preprocessing))
                ok.append(row)
            except Exception as e:  # missing, unreadable, not an image: PIL/OS errors of many kinds
                row["error"] = f"{type(e).__name__}: {e}"
        if images:  # one at a time: a whole-image run's files may differ in size
            x = torch.cat(
                [
                    to_float_normalized(
                        im[None].to(device), rm.mean, rm.std, rm.image_size, rm.interpolation
                    )
                    for im in images
                ]
            )
            probs = rm.logits(x).float().softmax(1)
            top_p, top_i = probs.topk(k, dim=1)
            for row, ps, ids in zip(ok, top_p.tolist(), top_i.tolist(), strict=True):
                row["top"] = [
                    {"class": rm.classes[i], "prob": round(p, 6)}
                    for p, i in zip(ps, ids, strict=True)
                ]
        results += rows
    return results


def format_table(results: list[dict]) -> str:
    """Aligned text: file, then class (prob) for each of the top k."""
    width = max(len(r["file"]) for r in results)
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['file']:{width}}  ERROR {r['error']}")
        else:
            lines.append(
                f"{r['file']:{width}}  "
                + "  ".join(f"{t['class']} ({t['prob']:.3f})" for t in r["top"])
            )
    return "\n".join(lines) + "\n"


def cmd_predict(args) -> int:
    """``transferlab predict``: print predictions; exit 0 if any file was predicted, else 1."""
    device = resolve_device(args.device)
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError("--top-k and --batch-size must be >= 1")
    rm = load_run_model(args.run_dir, device)
    files = expand_inputs(args.images)
    results = predict_files(rm, files, args.top_k, args.batch_size, device)
    if args.json:
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in results))
    else:
        sys.stdout.write(format_table(results))
    failed = [r for r in results if "error" in r]
    for r in failed:
        sys.stderr.write(f"transferlab: cannot read {r['file']}: {r['error']}\n")
    if failed:
        sys.stderr.write(
            f"transferlab: {len(results) - len(failed)} of {len(results)} file(s) predicted, "
            f"{len(failed)} failed\n"
        )
    return 0 if len(failed) < len(results) else 1


def add_arguments(p) -> None:
    """The arguments of ``transferlab predict`` (registered in ``cli.COMMANDS``)."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run dir (with best.pt)")
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGES_OR_DIRS",
        help="image files, or folders searched recursively",
    )
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per line instead of a table"
    )
    p.add_argument("--device", default="auto", help="auto (default) | cpu | cuda | cuda:N")
    p.add_argument(
        "--batch-size", type=int, default=64, help="images per forward pass (default 64)"
    )
