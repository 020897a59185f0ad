"""``transferlab export --format openvino``: the run's model as OpenVINO IR (xml + bin), checked.

Same contract as the ONNX export (export.py): input ``images`` float32 (N, 3, S, S) RGB in
[0, 1] with the normalisation folded in, output ``logits`` (N, classes). The metadata (classes,
mean, std, image size, preprocessing...) is stored in the IR's ``rt_info`` under ``transferlab``
(``model.get_rt_info(["transferlab", "classes"])``) as JSON strings, and in the sidecar JSON
that export.py writes. The bin is written first and the xml last, each to a temp file renamed
over its target, so an xml on disk always has its complete bin beside it.

The check compiles the IR on the CPU in fp32 (``INFERENCE_PRECISION_HINT=f32``: the default on
bf16-capable CPUs would be bf16) and compares the logits with PyTorch on random inputs, like the
ONNX check with onnxruntime.

``--int8`` writes NNCF's int8 quantisation of the IR instead, calibrated on the run's own
calibration set (at most 300 seeded training images, features/quantize.py; the same images as
the run's int8 features). Quantised logits differ from PyTorch's by far more than 1e-4, so its
check is the top-1 agreement with PyTorch on up to :data:`INT8_CHECK_IMAGES` of the run's
validation images (real images, not the calibration ones), against ``--min-agreement``.

Usage (export.py dispatches here):
    runtime, diff, batches, agreement = export_openvino(wrapped, 224, Path("runs/x/model.xml"),
                                                        meta)
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transferlab.config import Config
from transferlab.data.load import load_data
from transferlab.errors import UserError
from transferlab.features import quantize
from transferlab.features.engines import engine_module
from transferlab.features.pipeline import calibration_set, unit_batches
from transferlab.features.quantize import Calibration
from transferlab.io import temp_dir, write_atomic
from transferlab.plan import Plan
from transferlab.sigstack import keep_signal_stack

INPUT_NAME, OUTPUT_NAME = "images", "logits"  # as in export.py
INT8_CHECK_IMAGES = 500  # validation images of the int8 check


@dataclass(frozen=True)
class Int8Data:
    """What an int8 export reads from the run's data: the calibration set and the check images
    (both [0, 1] pixels at the run's size: the export's input)."""

    calibration: Calibration
    check_batches: list[torch.Tensor]


def int8_data(cfg: Config, plan: Plan) -> Int8Data:
    """The run's calibration set and up to INT8_CHECK_IMAGES validation images, from its data."""
    quantize.require_int8()
    ds = load_data(cfg)
    n = min(len(ds.val), INT8_CHECK_IMAGES)
    check = list(unit_batches(cfg, plan, ds.val, torch.arange(n), normalised=False))
    return Int8Data(calibration_set(cfg, plan, ds, normalised=False), check)


def write_openvino_ir(
    wrapped: nn.Module,
    size: int,
    output: Path,
    metadata: dict,
    calibration: Calibration | None = None,
) -> Path:
    """Convert ``wrapped`` and write ``output`` (.xml) and its .bin; returns the bin's path.
    With ``calibration`` the IR written is NNCF's int8 quantisation."""
    ov = engine_module("openvino")
    if output.suffix != ".xml":
        raise UserError(f"--format openvino writes an .xml (+ .bin) file; got --output {output}")
    root_level = logging.getLogger().level  # ov.convert_model sets the root logger to ERROR
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings
            model = ov.convert_model(wrapped.eval(), example_input=torch.rand(2, 3, size, size))
    finally:
        logging.getLogger().setLevel(root_level)
    model.reshape([-1, 3, size, size])
    if calibration is not None:
        model = quantize.quantize_model(model, calibration.batches())
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    for key, value in metadata.items():
        model.set_rt_info(json.dumps(value), ["transferlab", key])
    bin_path = output.with_suffix(".bin")
    with temp_dir(output) as tmp:
        xml_tmp = Path(tmp) / "model.xml"
        ov.save_model(model, str(xml_tmp), compress_to_fp16=False)
        xml_bytes, bin_bytes = xml_tmp.read_bytes(), xml_tmp.with_suffix(".bin").read_bytes()
    write_atomic(bin_path, bin_bytes)
    write_atomic(output, xml_bytes)
    return bin_path


@torch.inference_mode()
def check_openvino_ir(
    wrapped: nn.Module, xml: Path, size: int, batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0
) -> tuple[str, float]:
    """(runtime, max abs logit difference) of the IR on disk vs PyTorch on random [0, 1] input."""
    ov = engine_module("openvino")
    core = ov.Core()
    with keep_signal_stack():  # the CPU plugin swaps the thread's signal stack (sigstack.py)
        compiled = core.compile_model(
            core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
    g = torch.Generator().manual_seed(seed)
    diff = 0.0
    for n in batch_sizes:
        x = torch.rand(n, 3, size, size, generator=g)
        got = torch.from_numpy(compiled({INPUT_NAME: x.numpy()})[OUTPUT_NAME].copy())
        diff = max(diff, (got - wrapped(x).float()).abs().max().item())
    return f"openvino {ov.__version__} (CPU, f32)", diff


@torch.inference_mode()
def check_int8_ir(
    wrapped: nn.Module, xml: Path, batches: list[torch.Tensor]
) -> tuple[str, float, float, int]:
    """(runtime, top-1 agreement, max abs logit difference, images) of the int8 IR on disk
    against PyTorch on the run's validation images."""
    ov = engine_module("openvino")
    core = ov.Core()
    with keep_signal_stack():  # the CPU plugin swaps the thread's signal stack (sigstack.py)
        compiled = core.compile_model(
            core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
    same = n = 0
    diff = 0.0
    for x in batches:
        got = torch.from_numpy(compiled({INPUT_NAME: x.numpy()})[OUTPUT_NAME].copy())
        ref = wrapped(x).float()
        same += int((got.argmax(1) == ref.argmax(1)).sum())
        n += len(x)
        diff = max(diff, (got - ref).abs().max().item())
    return f"openvino {ov.__version__} (CPU, int8)", same / max(n, 1), diff, n


def export_openvino(
    wrapped: nn.Module,
    size: int,
    output: Path,
    metadata: dict,
    int8: Int8Data | None = None,
) -> tuple[str, float, tuple[int, ...], float | None]:
    """Write the IR and check it: (runtime, max abs logit difference, batch sizes, top-1
    agreement or None), which export.py turns into its ExportCheck (and the caller's JSON).
    With ``int8`` the IR is quantised and checked by top-1 agreement on validation images."""
    write_openvino_ir(wrapped, size, Path(output), metadata, int8.calibration if int8 else None)
    if int8 is None:
        runtime, diff = check_openvino_ir(wrapped, Path(output), size)
        return runtime, diff, (1, 3), None
    runtime, agreement, diff, n = check_int8_ir(wrapped, Path(output), int8.check_batches)
    return runtime, diff, (n,), agreement


def read_ir_metadata(xml: Path) -> dict:
    """The ``transferlab`` metadata stored in an exported IR (values decoded from JSON)."""
    model = engine_module("openvino").Core().read_model(str(xml))
    info = model.get_rt_info()["transferlab"]
    return {key: json.loads(info[key].astype(str)) for key in info}
