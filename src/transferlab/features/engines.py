"""Inference engines for a frozen backbone: torch, OpenVINO or onnxruntime, chosen by measurement.

An :class:`Engine` turns float NCHW batches (already resized and normalised) into float32
``(N, D)`` features. ``engine(x)`` runs one batch; ``engine.map(batches)`` runs a stream of them
in order and keeps the engine busy: OpenVINO keeps several asynchronous infer requests in flight
(``AsyncInferQueue``, ``PERFORMANCE_HINT=THROUGHPUT``), so the caller's next batch is prepared
while the previous ones run.

``resolve_engine`` turns ``--engine auto|torch|openvino|onnxruntime`` into an :class:`EngineChoice`
(engine, precision, extraction batch). ``auto`` times each available engine and precision on
random input, then 2-3 batch sizes of the winner, and remembers the result in
``cache_root/engines.json`` keyed by arch, size, device, the request and the library versions, so
the choice (and so the feature cache key) stays stable between runs. OpenVINO and onnxruntime are
optional extras: without them ``auto`` uses torch and says so; asking for one explicitly is a
one-line :class:`UserError` naming the extra. On CUDA only torch runs.

Every engine is one :class:`EngineSpec` in :data:`ENGINE_SPECS` (package, extra, CPU
precisions, runner, converter, loader, quantizer); everything else here, and ``--engine``'s and
``--feature-precision``'s choices in config.py, read the specs. int8 is a precision of the
OpenVINO spec: its quantizer is NNCF's post-training quantisation of the converted IR on the
run's calibration images (features/quantize.py); it is never probed against the others (``auto``
never picks it), and its model is cached with the calibration set's id in its key.

Converted models (OpenVINO IR, ONNX) are cached under ``cache_root/engines/`` in one safetensors
file each (model bytes + metadata + sha256), keyed by the weights hash, the architecture, the
size and the library versions; written atomically, checked on load, deleted and rebuilt when
corrupt, exactly like the feature files (features/cache.py).

The ``transferlab`` command's process keeps freed memory in its heap (``entry.py``'s glibc
tuning): without it every batch maps fresh pages and half the extraction time went to page
faults (issue 13). A library user's process is left as it is.

Usage:
    choice = resolve_engine("auto", model.backbone, "timm:tf_efficientnet_lite0", 224, device,
                            root, precision_requested="auto", channels_last=True)
    engine = build_engine(choice, model.backbone, 224, device, root, weights_hash(model.backbone))
    for feats in engine.map(prepare(x) for x in batches):
        ...
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import logging
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np
import torch
from torch import nn

from transferlab.errors import UserError
from transferlab.features import cache as fcache
from transferlab.features import quantize
from transferlab.features.quantize import Calibration
from transferlab.io import write_json
from transferlab.precision import autocast, cpu_has_fast_bf16, resolve_precision
from transferlab.sigstack import keep_signal_stack

log = logging.getLogger(__name__)

PROBE_BATCHES = (16, 32, 64)  # extraction batch candidates on the CPU (images per forward)
GPU_BATCH = 256  # extraction batch on CUDA (not probed: large batches are fast there)
FORMAT_VERSION = 1  # bump when the converted-model file layout changes
INT8_BATCH = 32  # int8 extraction batch (not probed: quantising needs the run's images)


@dataclass(frozen=True)
class EngineChoice:
    """The resolved extraction engine: part of the feature cache key and the run plan."""

    name: str  # torch | openvino | onnxruntime
    precision: str  # fp32 | bf16 | int8 (OpenVINO) (fp16 on CUDA)
    batch_size: int  # images per engine call

    def to_dict(self) -> dict:
        return asdict(self)


class Engine(Protocol):
    """Float NCHW batches -> float32 (N, D) features on the CPU (torch: on the input's device)."""

    choice: EngineChoice

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def map(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]: ...


# ----------------------------------------------------------------------------- runners


class TorchEngine:
    """``features(x)`` under inference_mode and autocast; channels_last input when asked."""

    def __init__(
        self,
        features: Callable[[torch.Tensor], torch.Tensor],
        choice: EngineChoice,
        device: torch.device,
        channels_last: bool = False,
    ):
        self.features, self.choice, self.device = features, choice, device
        self.channels_last = channels_last

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.choice.precision, self.device):
            return self.features(x).float()

    def map(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for x in batches:  # torch already spreads one forward over every core
            yield self(x)


class OpenVINOEngine:
    """A compiled OpenVINO model; ``map`` keeps ``requests`` async infer requests in flight."""

    def __init__(self, compiled, choice: EngineChoice, prepare_threads: int = 1):
        self.compiled, self.choice = compiled, choice
        # torch threads while map() runs (0: leave as is). The caller's resize + normalise runs
        # in torch between submissions; with 1 thread it no longer fights OpenVINO's streams for
        # the cores: extract/bare 0.90-0.99 vs 0.80-0.87 with 2 threads (lite0 bf16, RESULTS.md)
        self.prepare_threads = prepare_threads
        # twice the plugin's optimum (one per stream): a queued request starts the moment a
        # stream frees, while the caller is still preparing the next batch
        self.requests = 2 * max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._sync = compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self._sync.infer({0: _as_numpy(x)}, share_inputs=True)
        return torch.from_numpy(out[0].copy())

    def map(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        queue = engine_module("openvino").AsyncInferQueue(self.compiled, self.requests)
        done: dict[int, torch.Tensor] = {}
        inputs: dict[int, object] = {}  # keep shared input buffers alive until their request ends

        def finished(request, tag: int) -> None:  # runs on an OpenVINO thread
            done[tag] = torch.from_numpy(request.get_output_tensor(0).data.copy())
            inputs.pop(tag, None)

        queue.set_callback(finished)
        submitted = emitted = 0
        threads = torch.get_num_threads()
        if self.prepare_threads:
            torch.set_num_threads(self.prepare_threads)
        try:
            for x in batches:
                arr = _as_numpy(x)
                inputs[submitted] = arr
                queue.start_async({0: arr}, submitted, share_inputs=True)  # blocks while all busy
                submitted += 1
                while emitted in done:
                    yield done.pop(emitted)
                    emitted += 1
            queue.wait_all()
            while emitted < submitted:
                yield done.pop(emitted)
                emitted += 1
        finally:
            queue.wait_all()  # a stop or an error mid-stream leaves no request running
            torch.set_num_threads(threads)


class OnnxRuntimeEngine:
    """An onnxruntime CPU session (it parallelises each call over the cores itself)."""

    def __init__(self, session, choice: EngineChoice):
        self.session, self.choice = session, choice
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: _as_numpy(x)})[0])

    def map(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for x in batches:
            yield self(x)


def _as_numpy(x: torch.Tensor):
    return x.detach().to("cpu", torch.float32).contiguous().numpy()


# ----------------------------------------------------------------------------- converters, loaders


def _convert_openvino(backbone: nn.Module, example: torch.Tensor) -> bytes:
    """OpenVINO IR (xml + bin in one blob), with a dynamic batch."""
    ov = engine_module("openvino")
    with torch.no_grad():
        model = ov.convert_model(backbone, example_input=example)
    model.reshape([-1, *example.shape[1:]])  # dynamic batch, fixed C, H, W
    return _openvino_blob(model)


def _openvino_blob(model) -> bytes:
    """An ``openvino.Model`` as one blob: the xml's length (8 bytes), the xml, the weights."""
    ov = engine_module("openvino")
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        x_bytes, b_bytes = xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
    return len(x_bytes).to_bytes(8, "little") + x_bytes + b_bytes


def _split_openvino(blob: bytes) -> tuple[bytes, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return blob[8 : 8 + n], blob[8 + n :]


def _read_openvino(blob: bytes):
    ov = engine_module("openvino")
    xml, weights = _split_openvino(blob)
    return ov.Core().read_model(
        model=xml.decode(), weights=ov.Tensor(np.frombuffer(weights, np.uint8))
    )


def _quantize_openvino(blob: bytes, calibration: Calibration) -> bytes:
    """The IR blob quantised to int8 by NNCF on the calibration images (features/quantize.py)."""
    return _openvino_blob(quantize.quantize_model(_read_openvino(blob), calibration.batches()))


# OpenVINO's inference precision per extraction precision. int8: NNCF's quantised convolutions
# run in int8 whatever the hint; the ops left unquantised run in f32
_OV_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def _load_openvino(blob: bytes, precision: str):
    """A compiled OpenVINO model for the CPU plugin at ``precision``, on as many threads as
    torch was given for this phase (transferlab/threads.py), not on every core."""
    ov = engine_module("openvino")
    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": _OV_HINT[precision],
        "PERFORMANCE_HINT": "THROUGHPUT",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
    }
    with keep_signal_stack():  # the CPU plugin swaps the thread's signal stack (sigstack.py)
        return core.compile_model(_read_openvino(blob), "CPU", config)


def _convert_onnx(backbone: nn.Module, example: torch.Tensor) -> bytes:
    """ONNX (opset 17, legacy exporter), with a dynamic batch."""
    buf = io.BytesIO()
    torch.onnx.export(
        backbone,
        (example,),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["features"],
        dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
    )
    return buf.getvalue()


def _load_onnxruntime(blob: bytes, precision: str):
    """An onnxruntime CPU session (``precision`` is fp32: the spec allows no other)."""
    ort = engine_module("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class EngineSpec:
    """One extraction engine: all that the rest of the code asks about it.

    ``converter`` (backbone, example batch) -> model bytes, cached under ``cache_root/engines``;
    ``loader`` (bytes, precision) -> the loaded model that ``runner(loaded, choice)`` runs. An
    engine without a converter (torch) runs the backbone itself, on any device; converted
    engines run on the CPU. ``quantizer`` (bytes, calibration) -> int8 model bytes, for an
    engine with int8 among its precisions.
    """

    name: str
    package: str  # the Python package it imports (its version joins the cache keys)
    extra: str  # the pyproject extra that installs it ("" when the base install has it)
    precisions: tuple[str, ...]  # what it runs on the CPU, among fp32 | bf16 | int8
    runner: type  # the Engine class: runner(backbone, ...) for torch, runner(loaded, choice)
    converter: Callable[[nn.Module, torch.Tensor], bytes] | None = None
    loader: Callable[[bytes, str], object] | None = None  # (bytes, precision) -> loaded model
    quantizer: Callable[[bytes, Calibration], bytes] | None = None  # int8 (needs int8 extra)


# Adding an engine: its runner (a class with __call__ and map), converter and loader above, one
# spec here, and its extra in pyproject.toml. config's --engine choices derive from this dict.
ENGINE_SPECS: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec("torch", "torch", "", ("fp32", "bf16"), TorchEngine),
        EngineSpec(
            "openvino",
            "openvino",
            "openvino",
            ("fp32", "bf16", "int8"),
            OpenVINOEngine,
            _convert_openvino,
            _load_openvino,
            _quantize_openvino,
        ),
        EngineSpec(
            "onnxruntime",
            "onnxruntime",
            "onnxruntime",
            ("fp32",),  # the CPU execution provider has no bf16 convolutions
            OnnxRuntimeEngine,
            _convert_onnx,
            _load_onnxruntime,
        ),
    )
}
ENGINES = ("auto", *ENGINE_SPECS)  # the --engine choices
INT8_ENGINES = tuple(s.name for s in ENGINE_SPECS.values() if s.quantizer)  # int8 runs there
# the --feature-precision choices: auto (fp32 or bf16, measured; never int8), then every
# precision some engine runs on the CPU
FEATURE_PRECISIONS = (
    "auto",
    *dict.fromkeys(p for spec in ENGINE_SPECS.values() for p in spec.precisions),
)


# ----------------------------------------------------------------------------- availability


def engine_installed(name: str) -> bool:
    """True when the engine's Python package can be imported."""
    return importlib.util.find_spec(ENGINE_SPECS[name].package) is not None


def library_versions() -> dict[str, str]:
    """Versions of every engine's package ("none" when not installed)."""
    out = {}
    for spec in ENGINE_SPECS.values():
        if not engine_installed(spec.name):
            out[spec.package] = "none"
            continue
        mod = importlib.import_module(spec.package)
        out[spec.package] = str(getattr(mod, "__version__", "unknown"))
    return out


def require_engine(name: str) -> None:
    """UserError naming the extra when an explicitly requested engine is not installed."""
    spec = ENGINE_SPECS[name]
    if spec.extra and not engine_installed(name):
        raise UserError(
            f"--engine {name} needs the {spec.extra} extra: "
            f"pip install 'transferlab[{spec.extra}]' (or use --engine auto or torch)"
        )


def engine_module(name: str) -> ModuleType:
    """The engine's package, imported on first use (the optional extras' one loader)."""
    require_engine(name)
    return importlib.import_module(ENGINE_SPECS[name].package)


# ----------------------------------------------------------------------------- conversion


def _converted_key(engine: str, backbone: nn.Module, size: int, weights_hash: str) -> dict:
    return {
        "engine": engine,
        "weights": weights_hash,
        "size": size,
        "arch": fcache.cache_key({"repr": repr(backbone)}),  # the activations, not just shapes
        "versions": library_versions(),
        "format": FORMAT_VERSION,
    }


def _failed_op(err: BaseException) -> str:
    ops = sorted(set(re.findall(r"\b(?:aten|prim|onnx)::\w+", str(err))))
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ", ".join(ops) if ops else f"{type(err).__name__}: {first}"


def _convert(engine: str, backbone: nn.Module, size: int) -> bytes:
    """The engine's converted model as bytes (its spec's converter on an eval-mode backbone)."""
    example = torch.randn(1, 3, size, size)
    was_training = backbone.training
    root_level = logging.getLogger().level  # ov.convert_model sets the root logger to ERROR
    backbone.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings from the converters
            return ENGINE_SPECS[engine].converter(backbone, example)
    finally:
        backbone.train(was_training)
        logging.getLogger().setLevel(root_level)


def converted_model(
    engine: str,
    backbone: nn.Module,
    size: int,
    cache_root: Path,
    weights_hash: str,
    calibration: Calibration | None = None,
) -> bytes:
    """The converted backbone, from the cache when a matching, intact file is there.

    A file whose metadata does not match (other weights, size or library versions) is never
    used; a corrupt one is deleted (by ``load_entry``) and rebuilt. Raises the converter's error.
    With ``calibration``: the spec's int8 quantisation of it, keyed also by the calibration set
    and nncf's version.
    """
    parts = _converted_key(engine, backbone, size, weights_hash)
    if calibration is not None:
        parts["int8"] = {"calibration": calibration.key, **quantize.SETTINGS.key()}
    key = fcache.cache_key(parts)
    root = Path(cache_root) / "engines"
    hit = fcache.load_entry(root, key)
    if hit is not None:
        tensors, meta = hit
        if meta.get("key_parts") == json.dumps(parts, sort_keys=True):
            return tensors["model"].numpy().tobytes()
        log.warning(
            "converted model %s does not match this backbone; rebuilding it",
            fcache.entry_path(root, key),
        )
        fcache.entry_path(root, key).unlink(missing_ok=True)
    t0 = time.perf_counter()
    blob = _convert(engine, backbone, size)
    if calibration is not None:
        blob = ENGINE_SPECS[engine].quantizer(blob, calibration)
    log.info(
        "converted the backbone for %s%s in %.1fs",
        engine,
        " int8" if calibration is not None else "",
        time.perf_counter() - t0,
    )
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    try:
        fcache.save_entry(
            root,
            key,
            {"model": data},
            {"key_parts": json.dumps(parts, sort_keys=True), "engine": engine},
        )
    except OSError as e:
        log.warning("could not cache the converted model in %s (%s); continuing", root, e)
    return blob


# ----------------------------------------------------------------------------- building


def build_engine(  # noqa: PLR0913 - the model, where to cache it, and how to quantise it
    choice: EngineChoice,
    backbone: nn.Module,
    size: int,
    device: torch.device,
    cache_root: Path,
    weights_hash: str,
    channels_last: bool = False,
    fallback: bool = False,
    calibration: Calibration | None = None,
) -> Engine:
    """An engine for ``choice``. A failed conversion raises UserError, or with ``fallback``
    (``--engine auto``) warns once naming the op and returns a torch engine; read
    ``engine.choice`` for what was built (it belongs in the feature cache key).

    int8 needs ``calibration``: the quantised model is built from it on a cache miss. It never
    falls back: the user asked for int8.

    The backbone is put in eval mode: an engine extracts (BatchNorm on its running statistics,
    which a probe's random batches must not move), and a converter traces what it is given.
    """
    backbone.eval()
    spec = ENGINE_SPECS[choice.name]
    if spec.converter is None:  # runs the backbone itself
        if channels_last:
            backbone = backbone.to(memory_format=torch.channels_last)
        return spec.runner(backbone, choice, device, channels_last)
    require_engine(choice.name)
    if device.type != "cpu":
        raise UserError(
            f"--engine {choice.name} runs on the CPU only; use --engine torch or auto "
            f"with --device {device.type}"
        )
    int8 = choice.precision == "int8"
    if int8:
        quantize.require_int8()
        if spec.quantizer is None or calibration is None:
            raise ValueError(f"int8 on {choice.name} needs its quantizer and a calibration set")
    try:
        blob = converted_model(
            choice.name, backbone, size, cache_root, weights_hash, calibration if int8 else None
        )
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - converters raise many types; all mean "cannot convert"
        what = _failed_op(e)
        if not fallback or int8:
            raise UserError(
                f"--engine {choice.name} cannot convert this backbone ({what}); use --engine torch"
            ) from None
        log.warning(
            "%s cannot convert this backbone (%s); extracting with torch instead", choice.name, what
        )
        return build_engine(
            replace(choice, name="torch"),
            backbone,
            size,
            device,
            cache_root,
            weights_hash,
            channels_last,
        )
    return spec.runner(spec.loader(blob, choice.precision), choice)


def engine_backbone_forward(
    choice: EngineChoice,
    backbone: nn.Module,
    size: int,
    cache_root: Path,
    weights_hash: str,
    calibration: Calibration | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable for predict: float NCHW batch (normalised, at ``size``) -> float32 features,
    run in chunks of ``choice.batch_size`` on the chosen engine (CPU). int8 takes the run's
    ``calibration`` (its quantised model is usually in the cache already)."""
    engine = build_engine(
        choice,
        backbone,
        size,
        torch.device("cpu"),
        cache_root,
        weights_hash,
        channels_last=choice.name == "torch",
        calibration=calibration,
    )

    def forward(x: torch.Tensor) -> torch.Tensor:
        parts = list(engine.map(x.split(choice.batch_size)))
        return torch.cat(parts) if parts else torch.zeros(0)

    return forward


# ----------------------------------------------------------------------------- choosing


def _candidates(requested: str, precision_requested: str) -> list[tuple[str, str]]:
    """(engine, precision) pairs to consider for ``requested`` on the CPU."""
    cpu = torch.device("cpu")
    if precision_requested == "auto":
        precisions = ["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]
    else:
        precisions = [resolve_precision(precision_requested, cpu)]
    names = list(ENGINE_SPECS) if requested == "auto" else [requested]
    out = []
    for name in names:
        if engine_installed(name):
            out += [(name, p) for p in precisions if p in ENGINE_SPECS[name].precisions]
    if not out and requested != "auto":
        runs = " or ".join(ENGINE_SPECS[requested].precisions)
        raise UserError(
            f"--engine {requested} runs {runs} only on the CPU; use --precision "
            f"{ENGINE_SPECS[requested].precisions[0]} or auto (got {precision_requested})"
        )
    return out


def _throughput(engine: Engine, size: int, batch: int, n_batches: int) -> float:
    """img/s of ``engine.map`` over ``n_batches`` random batches (after one warm-up call)."""
    x = torch.randn(batch, 3, size, size)
    engine(x)  # warm-up: kernels and memory chosen on the first call
    t0 = time.perf_counter()
    for _ in engine.map(x for _ in range(n_batches)):
        pass
    return batch * n_batches / (time.perf_counter() - t0)


def _best_of_rounds(runs: dict, size: int, rounds: int = 2) -> dict:
    """{key: best img/s} over alternating rounds of ``runs`` = {key: (engine, batch)}."""
    best: dict = {}
    for _ in range(rounds):
        for key, (engine, batch) in runs.items():
            best[key] = max(best.get(key, 0.0), _throughput(engine, size, batch, 2))
    return best


def _memo_tag(
    arch: str, size: int, device: torch.device, requested: str, precision: str, channels_last: bool
) -> str:
    versions = ",".join(f"{k} {v}" for k, v in sorted(library_versions().items()))
    return (
        f"{arch}@{size}px/{device.type}/engine {requested}/precision {precision}/"
        f"channels_last {channels_last}/{versions}"
    )


def _read_memo(path: Path) -> dict:
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _memo_choice(known: dict, tag: str) -> EngineChoice | None:
    entry = known.get(tag)
    try:
        choice = EngineChoice(str(entry["name"]), str(entry["precision"]), int(entry["batch_size"]))
    except (TypeError, KeyError, ValueError):
        return None
    if (
        choice.name not in ENGINE_SPECS
        or choice.batch_size < 1
        or not engine_installed(choice.name)
    ):
        return None
    return choice


def resolve_engine(
    requested: str,
    backbone: nn.Module,
    arch: str,
    size: int,
    device: torch.device,
    cache_root: Path,
    precision_requested: str,
    channels_last: bool,
) -> EngineChoice:
    """Resolve ``--engine`` (and the extraction precision and batch) for one backbone.

    CUDA: torch, at the resolved precision, batch 256. CPU: explicit engines must be installed
    (else UserError naming the extra); ``auto`` measures every installed engine and precision,
    then the winner's batch size, and remembers the choice in ``cache_root/engines.json``.
    """
    if requested not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}; got {requested!r}")
    if device.type != "cpu":
        if requested not in ("auto", "torch"):
            raise UserError(
                f"--engine {requested} runs on the CPU only; use --engine torch or "
                f"auto with --device {device.type}"
            )
        return EngineChoice("torch", resolve_precision(precision_requested, device), GPU_BATCH)
    if requested != "auto":
        require_engine(requested)
    if precision_requested == "int8":  # asked for, never probed against the others
        return _int8_choice(requested)
    optional = [s.name for s in ENGINE_SPECS.values() if s.extra]
    if requested == "auto" and not any(engine_installed(n) for n in optional):
        log.info(
            "engine auto: %s not installed, so extraction uses torch "
            "(pip install 'transferlab[openvino]' for a faster CPU engine)",
            " and ".join(optional),
        )
    memo = Path(cache_root) / fcache.ENGINE_MEMO
    tag = _memo_tag(arch, size, device, requested, precision_requested, channels_last)
    known = _read_memo(memo)
    remembered = _memo_choice(known, tag)
    if remembered is not None:
        log.info("extraction engine for %s: %s (remembered in %s)", arch, remembered, memo)
        return remembered
    choice = _probe(
        requested, backbone, size, device, cache_root, precision_requested, channels_last
    )
    known[tag] = choice.to_dict()
    try:
        Path(cache_root).mkdir(parents=True, exist_ok=True)
        write_json(memo, known, indent=1)
    except OSError as e:
        log.warning("could not remember the engine choice in %s (%s)", memo, e)
    return choice


def _int8_choice(requested: str) -> EngineChoice:
    """The engine that runs int8 (the one spec with a quantizer, OpenVINO), when asked for."""
    if requested != "auto" and requested not in INT8_ENGINES:
        raise UserError(int8_engine_message(requested))
    quantize.require_int8()
    return EngineChoice(requested if requested != "auto" else INT8_ENGINES[0], "int8", INT8_BATCH)


def int8_engine_message(engine: str) -> str:
    """Why ``--engine engine`` cannot extract int8 (config.py's check says it too)."""
    return (
        f"--feature-precision int8 runs on {' or '.join(INT8_ENGINES)} (NNCF's quantised model); "
        f"--engine {engine} has no int8 path here: use --engine {INT8_ENGINES[0]} or auto"
    )


def _probe(
    requested: str,
    backbone: nn.Module,
    size: int,
    device: torch.device,
    cache_root: Path,
    precision_requested: str,
    channels_last: bool,
) -> EngineChoice:
    """Time each candidate at batch 32, then the winner at every PROBE_BATCHES size.

    Two alternating rounds, best of each: on a shared CPU a neighbour's burst then hits one
    round of every candidate rather than all of one candidate's timing.
    """
    whash = fcache.weights_hash(backbone)
    engines: dict[tuple[str, str], Engine] = {}
    for name, prec in _candidates(requested, precision_requested):
        choice = EngineChoice(name, prec, 32)
        engine = build_engine(
            choice,
            backbone,
            size,
            device,
            cache_root,
            whash,
            channels_last,
            fallback=requested == "auto",
        )
        if engine.choice.name == name:  # else conversion failed under auto (warned): skip it
            engines[(name, prec)] = engine
    timed = _best_of_rounds({k: (e, 32) for k, e in engines.items()}, size)
    best = max(timed, key=timed.get)
    by_batch = _best_of_rounds({b: (engines[best], b) for b in PROBE_BATCHES}, size)
    batch = max(by_batch, key=by_batch.get)
    log.info(
        "extraction engine probe at %dpx (img/s): %s; batches for %s %s: %s -> batch %d",
        size,
        ", ".join(f"{n} {p} {v:.0f}" for (n, p), v in timed.items()),
        *best,
        ", ".join(f"{b}: {v:.0f}" for b, v in by_batch.items()),
        batch,
    )
    return EngineChoice(best[0], best[1], batch)
