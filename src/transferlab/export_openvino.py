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

Usage (export.py dispatches here):
    check = export_openvino(wrapped, size=224, output=Path("runs/x/model.xml"), metadata=meta,
                            tolerance=1e-4)
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from transferlab.errors import UserError
from transferlab.features.engines import engine_module
from transferlab.io import temp_dir, write_atomic
from transferlab.sigstack import keep_signal_stack

INPUT_NAME, OUTPUT_NAME = "images", "logits"  # as in export.py


def write_openvino_ir(wrapped: nn.Module, size: int, output: Path, metadata: dict) -> Path:
    """Convert ``wrapped`` and write ``output`` (.xml) and its .bin; returns the bin's path."""
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


def export_openvino(wrapped: nn.Module, size: int, output: Path, metadata: dict, tolerance: float):
    """Write the IR and check it; returns export.py's ExportCheck (the caller writes the JSON)."""
    from transferlab.export import ExportCheck

    write_openvino_ir(wrapped, size, Path(output), metadata)
    runtime, diff = check_openvino_ir(wrapped, Path(output), size)
    return ExportCheck(runtime, diff, tolerance, (1, 3))


def read_ir_metadata(xml: Path) -> dict:
    """The ``transferlab`` metadata stored in an exported IR (values decoded from JSON)."""
    model = engine_module("openvino").Core().read_model(str(xml))
    info = model.get_rt_info()["transferlab"]
    return {key: json.loads(info[key].astype(str)) for key in info}
