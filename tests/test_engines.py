"""Extraction engines: outputs match torch, the auto choice is remembered, missing extras and
failed conversions are one-line errors, corrupt converted models are rebuilt, and extraction
stops within one batch when asked. Tiny conv nets at 16-32 px, CPU, seconds."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

from transferlab import entry
from transferlab.distributed import DistEnv
from transferlab.errors import TrainingStopped, UserError
from transferlab.features import cache as fcache
from transferlab.features import engines
from transferlab.features.engines import EngineChoice, build_engine, resolve_engine
from transferlab.features.extract import extract_with_engine

CPU = torch.device("cpu")
SIZE = 16


def tiny_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


class Histogram(nn.Module):
    """A backbone OpenVINO cannot convert (no rule for aten::histc)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.histc(self.conv(x), 4).expand(x.shape[0], 4)


def _build(name: str, net: nn.Module, root, precision: str = "fp32", batch: int = 4):
    return build_engine(
        EngineChoice(name, precision, batch), net, SIZE, CPU, root, fcache.weights_hash(net)
    )


@pytest.mark.parametrize("name", ["torch", "openvino", "onnxruntime"])
def test_engine_matches_torch(name, tmp_path):
    if name != "torch":
        pytest.importorskip(name)
    net = tiny_backbone()
    x = torch.randn(10, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = net(x)
    engine = _build(name, net, tmp_path)
    one = engine(x)
    streamed = torch.cat(list(engine.map(iter(x.split(4)))))  # 4 + 4 + 2: order kept
    assert one.dtype == torch.float32 and one.shape == ref.shape
    torch.testing.assert_close(one, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(streamed, ref, atol=1e-5, rtol=1e-4)


def test_openvino_bf16_is_close(tmp_path):
    pytest.importorskip("openvino")
    net = tiny_backbone()
    x = torch.randn(6, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = net(x)
    out = _build("openvino", net, tmp_path, precision="bf16")(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


def test_extract_with_engine_in_sample_order(tmp_path):
    pytest.importorskip("openvino")
    net = tiny_backbone()
    images = torch.randint(0, 256, (11, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(11)

    def prepare(x):
        return nn.functional.interpolate(x.float() / 255, size=(SIZE, SIZE), mode="bilinear")

    with torch.no_grad():
        ref = net(prepare(images))
    loader = list(zip(images.split(5), labels.split(5), strict=True))  # loader batches of 5
    engine = _build("openvino", net, tmp_path, batch=3)  # re-cut into engine batches of 3
    feats, img_s = extract_with_engine(engine, prepare, loader, DistEnv(), 11, progress=False)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-4)
    assert img_s > 0
    plain = engines.TorchEngine(net, EngineChoice("torch", "fp32", 4), CPU)
    got, _ = extract_with_engine(plain, prepare, loader, DistEnv(), 11, progress=False)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_auto_choice_is_remembered(tmp_path, monkeypatch):
    net = tiny_backbone()
    args = ("auto", net, "tiny", SIZE, CPU, tmp_path, "fp32", False)
    first = resolve_engine(*args)
    assert first.name in ("torch", "openvino", "onnxruntime") and first.precision == "fp32"
    assert first.batch_size in engines.PROBE_BATCHES
    memo = json.loads((tmp_path / "engines.json").read_text())
    assert list(memo.values()) == [first.to_dict()]

    def no_probe(*a, **k):
        raise AssertionError("probed again although the choice is remembered")

    monkeypatch.setattr(engines, "_probe", no_probe)
    assert resolve_engine(*args) == first
    # another library version is another key: measured again, never reused
    monkeypatch.setattr(engines, "library_versions", lambda: {"torch": "0.0-other"})
    with pytest.raises(AssertionError, match="probed again"):
        resolve_engine(*args)


def test_missing_extra_is_one_line_user_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(engines, "engine_installed", lambda name: name == "torch")
    net = tiny_backbone()
    for name in ("openvino", "onnxruntime"):
        with pytest.raises(UserError) as e:
            resolve_engine(name, net, "tiny", SIZE, CPU, tmp_path, "fp32", False)
        msg = str(e.value)
        assert "\n" not in msg and f"pip install 'transferlab[{name}]'" in msg
        assert msg.startswith(f"--engine {name} needs the {name} extra")
    with caplog.at_level(logging.INFO, logger="transferlab.features.engines"):
        choice = resolve_engine("auto", net, "tiny", SIZE, CPU, tmp_path, "fp32", False)
    assert choice.name == "torch"
    assert sum("not installed" in r.getMessage() for r in caplog.records) == 1


def test_cuda_device_means_torch(tmp_path):
    choice = resolve_engine(
        "auto", tiny_backbone(), "tiny", SIZE, torch.device("cuda"), tmp_path, "bf16", True
    )
    assert choice == EngineChoice("torch", "bf16", engines.GPU_BATCH)
    with pytest.raises(UserError, match="CPU only"):
        resolve_engine(
            "openvino", tiny_backbone(), "tiny", SIZE, torch.device("cuda"), tmp_path, "bf16", True
        )


def test_corrupt_converted_model_is_rebuilt(tmp_path, caplog):
    pytest.importorskip("openvino")
    net = tiny_backbone()
    _build("openvino", net, tmp_path)
    (path,) = (tmp_path / "engines").glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the model bytes
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        engine = _build("openvino", net, tmp_path)
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert fcache.load_entry(tmp_path / "engines", path.stem) is not None  # rebuilt, intact
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(engine(x), net(x), atol=1e-5, rtol=1e-4)


def test_converted_model_of_other_weights_is_never_used(tmp_path):
    pytest.importorskip("openvino")
    a, b = tiny_backbone(0), tiny_backbone(1)
    _build("openvino", a, tmp_path)
    # b's weights under a's hash would load a's model: the key includes the real weights hash
    engine = _build("openvino", b, tmp_path)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(engine(x), b(x), atol=1e-5, rtol=1e-4)
    assert len(list((tmp_path / "engines").glob("*.safetensors"))) == 2


def test_failed_conversion_explicit_error_auto_fallback(tmp_path, caplog):
    pytest.importorskip("openvino")
    net = Histogram().eval()
    with pytest.raises(UserError, match=r"aten::histc.*--engine torch"):
        _build("openvino", net, tmp_path)
    with caplog.at_level(logging.WARNING):
        engine = build_engine(
            EngineChoice("openvino", "fp32", 4),
            net,
            SIZE,
            CPU,
            tmp_path,
            fcache.weights_hash(net),
            fallback=True,
        )
    assert engine.choice == EngineChoice("torch", "fp32", 4)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "aten::histc" in warned[0]


class StopAfter:
    """stop_requested that turns true after ``n`` polls, with the exit code the CLI should use."""

    exit_code = 143

    def __init__(self, n: int):
        self.n, self.polls = n, 0

    def __call__(self) -> bool:
        self.polls += 1
        return self.polls > self.n


def test_stop_requested_within_one_batch():
    net = tiny_backbone()
    images = torch.randint(0, 256, (40, 3, SIZE, SIZE), dtype=torch.uint8)
    loader = list(zip(images.split(8), torch.arange(40).split(8), strict=True))
    prepared = []

    def prepare(x):
        prepared.append(x.shape[0])
        return x.float() / 255

    engine = engines.TorchEngine(net, EngineChoice("torch", "fp32", 4), CPU)
    stop = StopAfter(3)
    with pytest.raises(TrainingStopped) as e:
        extract_with_engine(
            engine,
            prepare,
            loader,
            DistEnv(),
            40,
            progress=False,
            desc="extract train",
            stop_requested=stop,
        )
    assert prepared == [4, 4, 4]  # stopped before the 4th engine batch (of 10)
    assert e.value.exit_code == 143
    assert "nothing of this split was cached" in str(e.value) and "Rerun" in str(e.value)
    with pytest.raises(TrainingStopped) as e:
        extract_with_engine(
            engine, prepare, loader, DistEnv(), 40, progress=False, stop_requested=lambda: True
        )
    assert e.value.exit_code == 130


def test_export_openvino_ir_with_metadata_and_check(tmp_path):
    pytest.importorskip("openvino")
    from transferlab.export_openvino import export_openvino, read_ir_metadata

    net = nn.Sequential(tiny_backbone(), nn.Linear(8, 5)).eval()
    meta = {"classes": ["a", "b", "c", "d", "e"], "image_size": SIZE, "mean": [0.5, 0.5, 0.5]}
    runtime, diff, batches, agreement = export_openvino(net, SIZE, tmp_path / "model.xml", meta)
    assert diff < 1e-4 and runtime.startswith("openvino") and agreement is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]
    assert read_ir_metadata(tmp_path / "model.xml") == meta
    with pytest.raises(UserError, match=r"\.xml"):
        export_openvino(net, SIZE, tmp_path / "model.onnx", meta)


def test_engine_backbone_forward_for_predict(tmp_path):
    pytest.importorskip("openvino")
    net = tiny_backbone()
    fwd = engines.engine_backbone_forward(
        EngineChoice("openvino", "fp32", 4), net, SIZE, tmp_path, fcache.weights_hash(net)
    )
    x = torch.randn(9, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(fwd(x), net(x), atol=1e-5, rtol=1e-4)


def test_cli_export_openvino(tiny_cifar, tmp_path, capsys):
    pytest.importorskip("openvino")
    from transferlab.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data-dir",
                str(tiny_cifar),
                "--run-dir",
                str(run),
                "--model",
                "cnn",
                "--epochs",
                "1",
                "--no-progress",
                "--device",
                "cpu",
                "--val-size",
                "50",
                "--batch-size",
                "50",
            ]
        )
        == 0
    )
    assert main(["export", str(run), "--format", "openvino"]) == 0
    assert "OK" in capsys.readouterr().out
    meta = json.loads((run / "model.xml.json").read_text())
    assert meta["format"] == "openvino" and meta["check"]["ok"]
    assert meta["check"]["runtime"].startswith("openvino")
    assert (run / "model.bin").stat().st_size > 0


# --- OpenVINO swaps the thread's alternate signal stack (transferlab/sigstack.py) --------------


def test_openvino_engine_leaves_the_signal_stack_alone(tmp_path):
    import gc

    from transferlab.sigstack import current_signal_stack

    before = current_signal_stack()
    if before is None:
        pytest.skip("sigaltstack is Linux-only")
    # two engines freed first-in first-out, as the engine probe does: each compile pushed its own
    # stack and each free popped back to what it saw, which left the second one's freed stack
    first = _build("openvino", tiny_backbone(), tmp_path)
    second = _build("openvino", tiny_backbone(1), tmp_path)
    second(first(torch.rand(2, 3, SIZE, SIZE)).new_zeros(2, 3, SIZE, SIZE))
    del first
    gc.collect()
    del second
    gc.collect()
    assert current_signal_stack().key() == before.key()


_SIGNAL_AFTER_ENGINE = """
import gc, os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
from test_engines import _build, tiny_backbone, SIZE
first = _build("openvino", tiny_backbone(), sys.argv[2])
second = _build("openvino", tiny_backbone(1), sys.argv[2])
del first  # first in, first out: as the engine probe frees its candidates
gc.collect()
del second
gc.collect()
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
os.kill(os.getpid(), signal.SIGTERM)  # the handler runs on the alternate signal stack
print("survived", got == [signal.SIGTERM], flush=True)
"""


def test_a_signal_after_an_openvino_engine_is_freed_is_handled(tmp_path):
    """Before the fix this child died with SIGSEGV (-11) and no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AFTER_ENGINE, str(Path(__file__).parent), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "survived True" in out.stdout


def test_only_the_command_tunes_the_allocator(tmp_path, monkeypatch):
    """glibc's heap tuning is process-wide, so it belongs to the ``transferlab`` process
    (entry.main), never to a library caller's (a notebook) that builds and runs an engine."""
    calls = []
    monkeypatch.setattr(entry, "reuse_freed_memory", lambda: calls.append(1) or True)
    _build("torch", tiny_backbone(), tmp_path)(torch.rand(2, 3, SIZE, SIZE))
    assert calls == []
    with pytest.raises(SystemExit):
        entry.main(["--version"])
    assert calls == [1]


def test_engines_run_the_same_under_the_commands_allocator(tmp_path):
    """The production setting (the tuned heap) with every installed engine, in one process:
    each engine's features equal the untuned torch features of the parent."""
    net, x = (
        tiny_backbone(),
        torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)),
    )
    torch.save({"net": net, "x": x}, tmp_path / "case.pt")
    code = (
        "import sys, torch\n"
        "from transferlab import entry\n"
        "from transferlab.features import cache as fcache, engines as E\n"
        "assert entry.reuse_freed_memory()\n"
        f"case = torch.load({str(tmp_path / 'case.pt')!r}, weights_only=False)\n"
        "for name in E.ENGINE_SPECS:\n"
        "    if not E.engine_installed(name):\n"
        "        continue\n"
        "    net, cpu = case['net'], torch.device('cpu')\n"
        "    choice = E.EngineChoice(name, 'fp32', 4)\n"
        "    e = E.build_engine(choice, net, 16, cpu, sys.argv[1], fcache.weights_hash(net))\n"
        "    got = torch.cat(list(e.map(case['x'].split(4))))\n"
        "    torch.save(got, f'{sys.argv[1]}/{name}.pt')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=300)
    with torch.no_grad():
        ref = net(x)
    for name in engines.ENGINE_SPECS:
        if engines.engine_installed(name):
            got = torch.load(tmp_path / f"{name}.pt")
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_the_auto_probe_leaves_a_partial_prefix_in_eval_mode_and_unchanged(tmp_path):
    """The engine probe (every engine, two rounds, an ONNX export that restores the mode it
    found) must not put partial mode's shared prefix in train mode: its BatchNorm would take the
    probe's random batches into its running statistics, and the engine converted next would
    normalise with batch statistics (a cold ``--engine auto`` partial run once trained on such
    activations: 12% val where a warm one reached 38%)."""
    from transferlab.config import ModelConfig
    from transferlab.models.partial import StagePrefix
    from transferlab.models.registry import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(name="timm:tf_efficientnet_lite0", weights="none", mode="partial")
    model = build_model(cfg, 10)
    model.train()  # the training loop's state; the frozen prefix stays in eval
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = StagePrefix(model.backbone, 1)
    resolve_engine("auto", prefix, "lite0@cut-1", 32, torch.device("cpu"), tmp_path, "auto", True)
    assert not any(m.training for m in prefix.modules())
    after = model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert not moved, moved[:5]
