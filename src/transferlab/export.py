"""``transferlab export``: a run's whole model (backbone + head) as ONNX or TorchScript.

Input contract of the exported graph: ``float32 (N, 3, S, S)`` RGB in ``[0, 1]`` (pixel / 255),
``S`` = the run's image size, N dynamic. The mean/std normalisation is folded into the graph,
so a consumer only decodes, resizes (shorter side to S, centre crop, as ``transferlab predict``
does) and divides by 255. Output: ``logits (N, classes)``; softmax them for probabilities.
We chose float over uint8 input so a consumer may resize in float with any library.

Beside the model, ``<output>.json`` records the classes, mean, std, image size, input and
output names, the run dir and the check's result; ONNX files also carry it as metadata_props.

The export is checked before the command succeeds: the exported model (run with onnxruntime,
or the TorchScript module reloaded from disk) and the PyTorch model get the same random
inputs, and the max abs difference of the logits must be within ``--tolerance`` (1e-4);
otherwise the command prints the difference and exits 1.

ONNX goes through torch's TorchScript-based exporter (``dynamo=False``): the dynamo exporter
needs the onnxscript package, which transferlab does not require.

Usage:
    transferlab export runs/lite0 --format onnx                # runs/lite0/model.onnx (+ .json)
    transferlab export runs/lite0 --format torchscript --output /tmp/lite0.pt
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transferlab.errors import EXIT_USER, RunFailure, UserError, describe_oserror
from transferlab.export_openvino import export_openvino, int8_data
from transferlab.extras import load_extra
from transferlab.features import quantize
from transferlab.io import temp_path, write_json
from transferlab.predict import RunModel, load_run_model
from transferlab.rundir import (
    check_output_path,
    data_root,
    expand_user,
    make_output_dir,
    refuse_inside,
)

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "openvino": "model.xml"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
OPSET = 17


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)`` for x in [0, 1]: the preprocessing inside the graph."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


@dataclass
class ExportCheck:
    """How the exported model compares with PyTorch: on random inputs (max abs logit
    difference within ``tolerance``), or for an int8 IR on the run's validation images (top-1
    ``agreement`` at least ``min_agreement``)."""

    runtime: str
    max_abs_diff: float
    tolerance: float
    batch_sizes: tuple[int, ...]
    agreement: float | None = None  # int8: share of images with PyTorch's top-1 class
    min_agreement: float = 0.0

    @property
    def ok(self) -> bool:
        if self.agreement is not None:
            return self.agreement >= self.min_agreement
        return self.max_abs_diff <= self.tolerance


def export_onnx(wrapped: nn.Module, size: int, path: Path, metadata: dict) -> None:
    """Write an ONNX model with a dynamic batch axis and the metadata as metadata_props."""
    onnx = load_extra("onnx", "export", "--format onnx")
    example = torch.rand(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    m = onnx.load(str(path))
    for key, value in metadata.items():
        entry = m.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def export_torchscript(wrapped: nn.Module, size: int, path: Path, metadata: dict) -> None:
    """Trace to TorchScript and save, with the metadata as the archive's extra file meta.json."""
    example = torch.rand(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python values in timm models
        traced = torch.jit.trace(wrapped, example, check_trace=False)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # torch.jit is deprecated in favour of torch.export
        torch.jit.save(traced, str(path), _extra_files={"meta.json": json.dumps(metadata)})


@torch.inference_mode()
def check_export(
    wrapped: nn.Module,
    path: Path,
    fmt: str,
    size: int,
    tolerance: float,
    batch_sizes: tuple[int, ...] = (1, 3),
    seed: int = 0,
) -> ExportCheck:
    """Max abs logit difference between the exported file and PyTorch on random [0, 1] inputs."""
    g = torch.Generator().manual_seed(seed)
    if fmt == "onnx":
        ort = load_extra("onnxruntime", "export", "--format onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])  # noqa: E731
        runtime = f"onnxruntime {ort.__version__}"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.jit.load(str(path), map_location="cpu").eval()
        run = loaded
        runtime = f"torchscript (torch {torch.__version__})"
    diff = 0.0
    for n in batch_sizes:
        x = torch.rand(n, 3, size, size, generator=g)
        diff = max(diff, (run(x).float() - wrapped(x).float()).abs().max().item())
    return ExportCheck(runtime, diff, tolerance, batch_sizes)


WRITER = "transferlab export"  # in every sidecar JSON: marks the output as ours to replace


def _is_our_export(path: Path) -> bool:
    """``path`` (a model or its sidecar) is an earlier export: its sidecar JSON says so."""
    sidecar = path if path.name.endswith(".json") else path.with_name(path.name + ".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (
        meta.get("writer") == WRITER or (meta.get("format") in FORMATS and "check" in meta)
    )


def _output_paths(run_dir: Path, fmt: str, output: Path | None, force: bool) -> tuple[Path, Path]:
    """(model path, sidecar path), refused when they would replace a file that is not ours."""
    output = expand_user(output, "--output") if output else Path(run_dir) / FORMATS[fmt]
    sidecar = output.with_name(output.name + ".json")
    for path in (output, sidecar):
        check_output_path(path, Path(run_dir), force, is_ours=_is_our_export)
    if fmt == "openvino":  # the IR's weights go beside its xml: ours when that xml is ours
        ours = _is_our_export(output)
        check_output_path(output.with_suffix(".bin"), Path(run_dir), force, is_ours=lambda p: ours)
    make_output_dir(output.parent, "--output")
    return output, sidecar


SPACE_MARGIN = 16 << 20  # bytes kept free beyond the estimate (graph, metadata, the sidecar)


def export_bytes(model: nn.Module) -> int:
    """About the size of an exported file: every parameter and buffer, as stored (fp32)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_free_space(folder: Path, need: int) -> None:
    """RunFailure (one line, exit 1) when ``folder`` has less than ``need`` + margin bytes free.

    The exporters write through C++ (protobuf, TorchScript's archive writer), which can abort the
    process on a full disk instead of raising, leaving a temp file behind: so we check first.
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # the write itself will say what is wrong with the folder
    if free < need + SPACE_MARGIN:
        raise RunFailure(
            f"not enough free space for the export in {folder}: it needs about "
            f"{(need + SPACE_MARGIN) / 1e6:.0f} MB, {free / 1e6:.0f} MB are free; free some "
            "space or pass --output on another disk"
        )


def _layout(rm: RunModel) -> str:
    """The sidecar's words for the input: the plan's preprocessing as the run evaluated."""
    pre = rm.preprocessing
    if pre.on_device_resize:  # a CIFAR run: the whole image, no crop
        return (
            f"RGB, NCHW; resize the whole image to {pre.crop}x{pre.crop} px ({pre.interpolation})"
        )
    return (
        f"RGB, NCHW; resize shorter side to {pre.resize} px ({pre.interpolation}), "
        f"centre crop {pre.crop} px"
    )


def _write_failure(e: OSError, path: Path) -> Exception:
    """A one-line error naming the output (not our temp file): 2 for the path, 1 for the disk."""
    code, line = describe_oserror(OSError(e.errno, e.strerror or str(e), str(path)))
    return (UserError if code == EXIT_USER else RunFailure)(f"cannot write the export: {line}")


def export_run(
    run_dir: Path,
    fmt: str,
    output: Path | None = None,
    tolerance: float = 1e-4,
    force: bool = False,
    int8: bool = False,
    min_agreement: float = 0.95,
) -> tuple[Path, ExportCheck]:
    """Export ``run_dir``'s best model to ``fmt``, write the metadata JSON, and check it.

    Both files are written to temp files and renamed over the targets, never through an
    existing file (a hard link would carry the write into its twin). An output onto one of the
    run's own files, or onto a file that no export wrote, is refused unless ``force``.
    ``int8`` (OpenVINO only): the IR is NNCF's int8 quantisation, checked by top-1 agreement.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"--tolerance must be a finite number >= 0; got {tolerance}")
    if fmt == "onnx":  # both before any work: the check runs the file with onnxruntime
        load_extra("onnx", "export", "--format onnx")
        load_extra("onnxruntime", "export", "--format onnx")
    if int8 and fmt != "openvino":
        raise UserError(f"--int8 quantises an OpenVINO IR; use --format openvino (got {fmt})")
    if not 0 <= min_agreement <= 1:
        raise UserError(f"--min-agreement must be in [0, 1]; got {min_agreement}")
    rm: RunModel = load_run_model(run_dir, "cpu")
    root = data_root(rm.config.data.dataset, rm.config.data.data_dir) if rm.config else None
    if root is not None and output:  # never inside the data: a later run would read it
        refuse_inside(expand_user(output, "--output"), root, "--output")
    output, sidecar = _output_paths(Path(run_dir), fmt, output, force)
    check_free_space(output.parent, export_bytes(rm.model))
    wrapped = NormalizedModel(rm.model, rm.mean, rm.std).eval()
    meta = {
        "format": fmt,
        "model": rm.name,
        "run_dir": str(run_dir),
        "classes": rm.classes,
        "image_size": rm.image_size,
        "mean": list(rm.mean),
        "std": list(rm.std),
        "preprocessing": dataclasses.asdict(rm.preprocessing),
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["N", 3, rm.image_size, rm.image_size],
            "range": [0.0, 1.0],
            "layout": _layout(rm),
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["N", len(rm.classes)],
            "meaning": "logits (softmax for probabilities)",
        },
    }
    meta["writer"] = WRITER
    try:
        if fmt == "openvino":  # xml + bin, each written atomically: see export_openvino.py
            data = int8_data(rm.config, rm.plan) if int8 else None
            if data is not None:
                meta["int8"] = {
                    "calibration": data.calibration.key,
                    **quantize.SETTINGS.key(),
                    "quantiser": "nncf.quantize (post-training, <= 300 seeded training images)",
                }
            runtime, diff, batches, agreement = export_openvino(
                wrapped, rm.image_size, output, meta, data
            )
            check = ExportCheck(runtime, diff, tolerance, batches, agreement, min_agreement)
        else:
            with temp_path(output) as tmp:
                writer = export_onnx if fmt == "onnx" else export_torchscript
                writer(wrapped, rm.image_size, tmp, meta)
                check = check_export(wrapped, tmp, fmt, rm.image_size, tolerance)
        meta["check"] = {
            "runtime": check.runtime,
            "max_abs_diff": check.max_abs_diff,
            "tolerance": tolerance,
            "ok": check.ok,
        }
        if check.agreement is not None:
            meta["check"]["top1_agreement"] = check.agreement
            meta["check"]["min_agreement"] = check.min_agreement
            meta["check"]["images"] = check.batch_sizes[0]
        write_json(sidecar, meta)
    except OSError as e:
        raise _write_failure(e, output) from None
    return output, check


def cmd_export(args) -> int:
    """``transferlab export``: write the model, print the check; exit 1 if it fails tolerance."""
    path, check = export_run(
        Path(args.run_dir),
        args.format,
        args.output or None,
        args.tolerance,
        force=args.force,
        int8=args.int8,
        min_agreement=args.min_agreement,
    )
    verdict = "OK" if check.ok else "FAILED"
    sys.stdout.write(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB) + {path.name}.json\n")
    if check.agreement is not None:
        sys.stdout.write(
            f"check: {check.runtime} vs PyTorch on {check.batch_sizes[0]} validation images: "
            f"top-1 agreement {check.agreement:.3f} (minimum {check.min_agreement:g}), "
            f"max abs diff {check.max_abs_diff:.3g} {verdict}\n"
        )
        if not check.ok:
            sys.stderr.write(
                f"transferlab: export check failed: top-1 agreement {check.agreement:.3f} < "
                f"{check.min_agreement:g}\n"
            )
            return 1
        return 0
    sys.stdout.write(
        f"check: {check.runtime} vs PyTorch on random inputs "
        f"(batch {', '.join(map(str, check.batch_sizes))}): "
        f"max abs diff {check.max_abs_diff:.3g} (tolerance {check.tolerance:g}) {verdict}\n"
    )
    if not check.ok:
        sys.stderr.write(
            f"transferlab: export check failed: max abs diff {check.max_abs_diff:.3g} > "
            f"{check.tolerance:g}\n"
        )
        return 1
    return 0


def add_arguments(p) -> None:
    """The arguments of ``transferlab export`` (registered in ``cli.COMMANDS``)."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run dir (with best.pt)")
    p.add_argument(
        "--format",
        required=True,
        choices=tuple(FORMATS),
        help="onnx, torchscript or openvino (IR: .xml + .bin)",
    )
    p.add_argument(
        "--output",
        default="",
        help="output file (default RUN_DIR/model.onnx or RUN_DIR/model.torchscript.pt)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="max abs logit difference allowed (default 1e-4)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="with --format openvino: write NNCF's int8 quantisation of the IR, calibrated on "
        "the run's own <= 300 seeded training images, checked by top-1 agreement with PyTorch "
        "on its validation images (needs the run's data and the int8 extra)",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        default=0.95,
        help="--int8: the least top-1 agreement with PyTorch that passes (default 0.95)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --output even if it is one of the run's files or not an earlier export",
    )
