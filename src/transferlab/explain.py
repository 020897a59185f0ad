"""Why the model decides: Grad-CAM overlays (pytorch-grad-cam, extra ``transferlab[explain]``).

The model is rebuilt from the run's ``best.pt`` (``predict.load_run_model``), so this works for
runs trained on cached features too: the backbone is loaded again for the handful of images.
The target layer is chosen generically (:func:`target_layer`): for a timm backbone the module of
its last ``feature_info`` stage, for a torchvision backbone its last top-level child that holds
convolutions (``layer4`` of a ResNet, ``features`` of an EfficientNet/ConvNeXt), and for the seed
CNN its last conv block (Conv-ReLU-BatchNorm, before the last pooling: 2x2 at 32 px input).

Each overlay panel shows the class-activation map of one class: the predicted one, and the true
one (or, for a correct image, the class it is most often confused with). Maps are normalised
per image to [0, 1] by pytorch-grad-cam; warm colours are where the evidence for that class is.

Usage:
    paths = explain_images(Path("runs/lite0"), [Path("cat.jpg")], Path("out"))
    transferlab explain runs/lite0 photos/ --out overlays/ --target leopard
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from transferlab.data.folder import load_image
from transferlab.data.preprocess import to_float_normalized
from transferlab.distributed import resolve_device
from transferlab.errors import UserError
from transferlab.io import write_atomic
from transferlab.models.taps import LayerTaps
from transferlab.predict import expand_inputs, load_run_model
from transferlab.rundir import RunDir, data_root, make_output_dir, refuse_inside

log = logging.getLogger(__name__)

DISPLAY_PX = 128  # side of each panel in the figures (CIFAR images are upscaled from 32 px)
ALPHA = 0.45  # weight of the heat map over the image


def available() -> bool:
    """True when the ``grad-cam`` package (module ``pytorch_grad_cam``) is installed."""
    return importlib.util.find_spec("pytorch_grad_cam") is not None


def require() -> None:
    """A one-line UserError naming the extra when ``grad-cam`` is missing."""
    if not available():
        raise UserError("Grad-CAM needs the grad-cam package: pip install 'transferlab[explain]'")


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def target_layer(model: nn.Module) -> nn.Module:
    """The layer whose activations Grad-CAM weighs: the last conv stage of the backbone."""
    backbone = model.backbone
    if isinstance(backbone, LayerTaps):  # --feature-layers wraps the timm network
        backbone = backbone.net
    info = getattr(backbone, "feature_info", None)
    if info is not None:  # timm: the module of the last (deepest) feature stage
        names = [f["module"] for f in info] if isinstance(info, list) else info.module_name()
        return backbone.get_submodule(names[-1])
    children = list(backbone.children())
    if isinstance(backbone, nn.Sequential) and all(not list(c.children()) for c in children):
        # a flat stack of layers (the seed CNN): the last conv block's output, before its pooling
        last_conv = max(i for i, c in enumerate(children) if isinstance(c, nn.Conv2d))
        block = children[last_conv:]
        pool = next(
            (
                i
                for i, c in enumerate(block)
                if isinstance(c, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))
            ),
            len(block),
        )
        return block[pool - 1]
    with_conv = [c for c in children if _has_conv(c)]  # torchvision: layer4, features, ...
    if not with_conv:
        raise UserError(f"{type(backbone).__name__} has no convolutional stage for Grad-CAM")
    return with_conv[-1]


def layer_name(model: nn.Module) -> str:
    """The dotted name of :func:`target_layer` in ``model`` (``backbone.layer4``)."""
    layer = target_layer(model)
    return next(n for n, m in model.named_modules() if m is layer)


@dataclass(frozen=True)
class Overlays:
    """Grad-CAM results for a batch: probabilities and one map per (image, class) asked for."""

    probs: np.ndarray  # (N, C) softmax
    maps: np.ndarray  # (N, K, S, S) in [0, 1], S = the model's input side


def cam_maps(rm, images: torch.Tensor, targets: list[list[int]], device: torch.device) -> Overlays:
    """Grad-CAM maps of ``targets[i]`` (class ids) for each uint8 (3, H, W) image ``images[i]``.

    ``rm`` is a ``predict.RunModel``; images are resized and normalised as the run trained.
    """
    require()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = rm.model.to(device).eval()
    for p in model.parameters():  # a frozen backbone has no grads; Grad-CAM needs them
        p.requires_grad_(True)
    x = to_float_normalized(images.to(device), rm.mean, rm.std, rm.image_size, rm.interpolation)
    with torch.no_grad():
        probs = model(x).float().softmax(1).cpu().numpy()
    k = len(targets[0])
    rep = x.repeat_interleave(k, dim=0)  # one row per (image, class): one forward, one backward
    flat = [ClassifierOutputTarget(int(t)) for ts in targets for t in ts]
    with GradCAM(model=model, target_layers=[target_layer(model)]) as cam:
        maps = cam(input_tensor=rep, targets=flat)
    return Overlays(probs, maps.reshape(len(targets), k, *maps.shape[1:]))


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W[, 3]) float array to (size, size[, 3]), bilinear."""
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    t = t.permute(2, 0, 1)[None] if t.dim() == 3 else t[None, None]
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    t = t[0].permute(1, 2, 0) if img.ndim == 3 else t[0, 0]
    return t.clamp(0, 1).numpy()


def overlay(image: np.ndarray, cam: np.ndarray, size: int = DISPLAY_PX) -> np.ndarray:
    """A uint8 (3, H, W) image with a (S, S) map in [0, 1] on top, as float (size, size, 3)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = _resize(np.transpose(image, (1, 2, 0)).astype(np.float32) / 255.0, size)
    return show_cam_on_image(rgb, _resize(cam, size), use_rgb=True, image_weight=1 - ALPHA) / 255.0


def plot_rows(
    rows: list[tuple[np.ndarray, list[np.ndarray], list[str]]], out_png: Path, per_row: int = 2
) -> Path:
    """Save a figure: per item, the image then its overlays, ``per_row`` items side by side.

    ``rows``: (uint8 (3, H, W) image, [maps], [caption of the image, then one per map]).
    """
    panels = 1 + len(rows[0][1])
    n_rows = (len(rows) + per_row - 1) // per_row
    fig = Figure(figsize=(per_row * panels * 1.75, n_rows * 2.05))
    axes = np.atleast_2d(fig.subplots(n_rows, per_row * panels, squeeze=False))
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, maps, captions) in enumerate(rows):
        r, c0 = divmod(i, per_row)
        tiles = [_resize(np.transpose(image, (1, 2, 0)) / 255.0, DISPLAY_PX)]
        tiles += [overlay(image, m) for m in maps]
        for j, (tile, cap) in enumerate(zip(tiles, captions, strict=True)):
            ax = axes[r, c0 * panels + j]
            ax.imshow(tile)
            ax.set_title(cap, fontsize=7)
    fig.tight_layout()
    write_atomic(  # the Software tag marks the PNG as ours: a later explain may replace it
        out_png, lambda f: fig.savefig(f, format="png", dpi=100, metadata={"Software": WRITER})
    )
    return out_png


WRITER = "transferlab explain"  # the PNG's Software text chunk


def is_our_overlay(path: Path) -> bool:
    """``path`` is a PNG that explain (or a run report's Grad-CAM figure) wrote."""
    try:
        with Image.open(path) as im:
            return im.info.get("Software") == WRITER
    except Exception:  # noqa: BLE001 - not an image, unreadable: not ours
        return False


def _short(name: str, n: int = 16) -> str:
    return name if len(name) <= n else name[: n - 1] + "."


def explain_images(
    run_dir: Path,
    images: list,
    out_dir: Path,
    target: str | None = None,
    device: str = "cpu",
    names: list[str] | None = None,
) -> list[Path]:
    """One PNG per readable image in ``out_dir``: the image, the map of its predicted class, and
    the map of ``target`` (a class name) when given. ``images`` are paths or file objects (PNG
    bytes). Unreadable images are skipped with a warning; a UserError when none is readable."""
    require()
    dev = resolve_device(device)
    rm = load_run_model(run_dir, dev)
    if target is not None and target not in rm.classes:
        raise UserError(
            f"--target {target!r} is not a class of {run_dir}; e.g. {', '.join(rm.classes[:5])}"
        )
    names = names or [
        Path(str(p)).stem if isinstance(p, (str, Path)) else f"image_{i}"
        for i, p in enumerate(images)
    ]
    root = data_root(rm.config.data.dataset, rm.config.data.data_dir) if rm.config else None
    if root is not None:  # its files would be read as data by the next run
        refuse_inside(out_dir, root, "--out")
    make_output_dir(out_dir, "--out")
    written, used = [], set()
    for image, name in zip(images, names, strict=True):
        try:
            x = load_image(image, rm.preprocessing)  # the eval transform predict uses
        except Exception as e:  # missing, unreadable, not an image
            log.warning("cannot read %s: %s: %s", name, type(e).__name__, e)
            continue
        with torch.no_grad():
            pred = int(cam_maps_probs(rm, x[None], dev).argmax())
        ids = [pred] + ([rm.classes.index(target)] if target is not None else [])
        res = cam_maps(rm, x[None], [ids], dev)
        caps = [
            _short(name, 22),
            f"map: {_short(rm.classes[pred])} (pred {res.probs[0, pred]:.2f})",
        ]
        if target is not None:
            caps.append(f"map: {_short(target)} (target {res.probs[0, ids[1]]:.2f})")
        stem = name if name not in used else f"{name}_{len(used)}"
        used.add(stem)
        target_png = out_dir / f"{stem}_gradcam.png"
        if target_png.exists() and not is_our_overlay(target_png):
            raise UserError(
                f"--out: {target_png} exists and was not written by transferlab explain; "
                "choose another --out (nothing of yours is replaced)"
            )
        written.append(plot_rows([(x.numpy(), list(res.maps[0]), caps)], target_png, per_row=1))
    if not written:
        raise UserError(
            "no readable image to explain: pass image files or folders that contain them"
        )
    return written


def cam_maps_probs(rm, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """Softmax probabilities of uint8 images (no gradients): to pick the predicted class."""
    x = to_float_normalized(images.to(device), rm.mean, rm.std, rm.image_size, rm.interpolation)
    return rm.model.eval()(x).float().softmax(1).cpu().numpy()


# ---------------------------------------------------------------- report section


def report_figures(
    run_dir: Path,
    preds: dict,
    classes: list[str],
    pairs: list[tuple[int, int, int]],
    load_images,
    n_mistakes: int = 12,
    n_correct: int = 6,
) -> list[str]:
    """Markdown lines of the report's Grad-CAM section (writes gradcam_*.png into ``run_dir``).

    ``preds``: test_predictions.npz arrays; ``pairs``: the most confused (true, pred, count);
    ``load_images(indices, size)``: (uint8 images, reason when unavailable) of test images.
    """
    rm = load_run_model(run_dir, "cpu")
    true, pred, prob = preds["true"], preds["pred"], preds["prob"]
    out = [
        "## Why the model decides (Grad-CAM)",
        "",
        f"Class-activation maps (Grad-CAM on `{layer_name(rm.model)}`, "
        "the last conv "
        "stage), red where the evidence for the named class lies.",
        "",
    ]
    wrong = np.flatnonzero(true != pred)
    pick = wrong[np.argsort(-prob[wrong], kind="stable")][:n_mistakes]
    if len(pick):
        images, why = load_images(preds["index"][pick], rm.image_size)
        if not images:
            return out + [f"Overlays not drawn: {why}.", ""]
        x = torch.from_numpy(np.stack(images))
        res = cam_maps(rm, x, [[int(pred[i]), int(true[i])] for i in pick], torch.device("cpu"))
        rows = [
            (
                img,
                list(m),
                [
                    f"true {_short(classes[true[i]])}",
                    f"map: {_short(classes[pred[i]])} (pred {prob[i]:.2f})",
                    f"map: {_short(classes[true[i]])} (true)",
                ],
            )
            for img, m, i in zip(images, res.maps, pick, strict=True)
        ]
        plot_rows(rows, RunDir(run_dir).gradcam_mistakes)
        out += [
            f"The {len(pick)} most confident mistakes: the image, the map for the predicted class, "
            "the map for the true class.",
            "",
            f"![Grad-CAM on mistakes]({RunDir.GRADCAM_MISTAKES})",
            "",
        ]
    correct_rows = _correct_examples(preds, pairs, n_correct)
    if correct_rows:
        idx = [i for i, _ in correct_rows]
        images, why = load_images(preds["index"][idx], rm.image_size)
        if images:
            x = torch.from_numpy(np.stack(images))
            res = cam_maps(rm, x, [[int(true[i]), c] for i, c in correct_rows], torch.device("cpu"))
            rows = [
                (
                    img,
                    list(m),
                    [
                        f"correct {_short(classes[true[i]])}",
                        f"map: {_short(classes[true[i]])} ({prob[i]:.2f})",
                        f"map: {_short(classes[c])} (confused)",
                    ],
                )
                for img, m, (i, c) in zip(images, res.maps, correct_rows, strict=True)
            ]
            plot_rows(rows, RunDir(run_dir).gradcam_correct)
            out += [
                "One correct example per most-confused true class: the map for its class, and the "
                "map for the class it is most often mistaken for.",
                "",
                f"![Grad-CAM on correct examples]({RunDir.GRADCAM_CORRECT})",
                "",
            ]
    return out


def _correct_examples(
    preds: dict, pairs: list[tuple[int, int, int]], n: int
) -> list[tuple[int, int]]:
    """(test row, confusing class): the most confident correct image of each confused class."""
    true, pred, prob = preds["true"], preds["pred"], preds["prob"]
    out, seen = [], set()
    for t, p, _ in pairs:
        if t in seen:
            continue
        seen.add(t)
        ok = np.flatnonzero((true == t) & (pred == t))
        if len(ok):
            out.append((int(ok[np.argmax(prob[ok])]), int(p)))
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------- CLI


def cmd_explain(args) -> int:
    """``transferlab explain``: write the overlays, print their paths."""
    paths = explain_images(
        Path(args.run_dir),
        expand_inputs(args.images),
        Path(args.out),
        target=args.target,
        device=args.device,
    )
    sys.stdout.write("".join(f"wrote {p}\n" for p in paths))
    return 0


def add_arguments(p) -> None:
    """The arguments of ``transferlab explain`` (registered in ``cli.COMMANDS``)."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run dir (with best.pt)")
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGES_OR_DIRS",
        help="image files, or folders searched recursively",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the <image>_gradcam.png files"
    )
    p.add_argument(
        "--target", default=None, metavar="CLASS", help="also map this class (e.g. the true one)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N | auto")
