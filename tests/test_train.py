"""Training modes, optimisers, schedules, precision, checkpoints and resume (issues 2 and 4).

Unit tests use tiny tensors; the end-to-end ones drive ``transferlab train`` on a synthetic
CIFAR-100 (150 train / 50 val / 50 test images), a few steps each. The pretrained-backbone modes
use timm's 0.37M-parameter ``test_resnet`` (a ResNet with BatchNorm, made for tests) at 32 px;
its "pretrained" weights are a random state dict saved by the test (1000-class fc included, as
a downloaded file has), so we can check exactly which tensors training may and may not change.
ResNet-18's own counts are checked in test_models.py and test_compare.py.
"""

from __future__ import annotations

import json
import math
import signal

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, metrics_rows
from transferlab.cli import build_parser, config_from_args, main
from transferlab.config import ModelConfig, OptimConfig
from transferlab.data.cifar import write_cifar_like
from transferlab.distributed import DistEnv
from transferlab.errors import TrainingStopped, UserError
from transferlab.experiment import run_experiment
from transferlab.io import write_torch
from transferlab.models.registry import build_model
from transferlab.precision import autocast, make_scaler, resolve_precision
from transferlab.training.checkpoint import load_checkpoint
from transferlab.training.loop import OptimParts, StepContext, StepGuard, evaluate, train_one_epoch
from transferlab.training.optim import build_optimizer, build_scheduler

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_cifar_like(tmp_path_factory.mktemp("train-data"), n_train=200, n_test=50)


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """(path, state) of a timm test_resnet state dict (1000-class fc) with non-trivial BN stats."""
    torch.manual_seed(7)
    net = timm.create_model("test_resnet", pretrained=False)
    for m in net.modules():  # BN running stats that a wrongly-trained BN would visibly move
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.9, 1.1)
    state = net.state_dict()
    path = tmp_path_factory.mktemp("w") / "test_resnet.pth"
    torch.save(state, path)
    return path, {k: v for k, v in state.items() if not k.startswith("fc.")}


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """`train` installs SIGINT/SIGTERM handlers; give pytest its own back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _train(data_dir, run_dir, *flags) -> int:
    return main(["train", "--data-dir", str(data_dir), "--run-dir", str(run_dir), *TINY, *flags])


def _backbone(state: dict) -> dict:
    return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}


def _groups(ckpt: dict) -> dict[str, dict]:
    return {g["name"]: g for g in ckpt["optimizer"]["param_groups"]}


# ---------------------------------------------------------------- optimisers and schedules


@pytest.mark.parametrize(
    "name, cls",
    [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)],
)
def test_optimizers_and_no_decay_on_norms_and_biases(name, cls):
    model = build_model(ModelConfig(name="cnn"), num_classes=100)
    opt = build_optimizer(
        model, OptimConfig(optimizer=name, lr=0.1, weight_decay=5e-4), backbone_lr_div=1.0
    )
    assert type(opt) is cls
    seen = 0
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 else 5e-4)
            seen += p.numel()
    assert seen == 846_308  # every parameter, each exactly once
    if name == "sgd":
        assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)


def test_optimizer_sees_only_trainable_params_with_backbone_lr_div():
    frozen = build_model(
        ModelConfig(name="resnet18", weights="none", mode="frozen"), num_classes=100
    )
    opt = build_optimizer(frozen, OptimConfig(lr=0.01), backbone_lr_div=10.0)
    assert {g["name"] for g in opt.param_groups} == {"head", "head_no_decay"}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 157_028
    tuned = build_model(
        ModelConfig(name="resnet18", weights="none", mode="finetune"), num_classes=100
    )
    groups = {
        g["name"]: g["lr"] for g in build_optimizer(tuned, OptimConfig(lr=0.01), 4.0).param_groups
    }
    assert groups == pytest.approx(
        {"backbone": 0.0025, "backbone_no_decay": 0.0025, "head": 0.01, "head_no_decay": 0.01}
    )


def _lrs(
    schedule: str, warmup_epochs: float, steps: int = 10, epochs: int = 3, optimizer: str = "adam"
) -> list[list[float]]:
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2, 2))]
    opt = torch.optim.Adam(
        [{"params": [params[0]], "lr": 0.01}, {"params": [params[1]], "lr": 0.1}]
    )
    if optimizer == "sgd":
        opt = torch.optim.SGD(
            [{"params": [params[0]], "lr": 0.01}, {"params": [params[1]], "lr": 0.1}], momentum=0.9
        )
    cfg = OptimConfig(optimizer=optimizer, schedule=schedule, warmup_epochs=warmup_epochs, lr=0.1)
    sched = build_scheduler(opt, cfg, steps_per_epoch=steps, epochs=epochs)
    out = []
    for _ in range(steps * epochs):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def test_schedule_none_is_constant():
    assert all(lr == [0.01, 0.1] for lr in _lrs("none", 0))


def test_cosine_with_linear_warmup():
    lrs = [lr[1] for lr in _lrs("cosine", warmup_epochs=1)]  # 10 warm-up steps of 30
    assert lrs[0] == pytest.approx(0.01)  # 1/10 of the peak
    assert lrs[9] == pytest.approx(0.1)  # peak at the end of warm-up
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(b < a for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[10] <= lrs[9]
    assert lrs[-1] < 0.002  # cosine decays towards 0 at the last step
    groups = _lrs("cosine", warmup_epochs=1)
    assert all(g[0] == pytest.approx(g[1] / 10) for g in groups)  # per-group ratio kept


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_onecycle_warmup_sets_the_peak(optimizer):
    lrs = [lr[1] for lr in _lrs("onecycle", warmup_epochs=1, optimizer=optimizer)]
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert peak in (9, 10) and lrs[peak] == pytest.approx(0.1, rel=1e-3)  # pct_start = 10/30
    assert lrs[0] == pytest.approx(
        0.1 / 25, rel=1e-3
    )  # OneCycle's initial lr = max_lr / div_factor
    assert lrs[-1] < 1e-4


def test_label_smoothing_is_used_in_training_not_in_evaluation():
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    x, y = torch.randn(8, 5), torch.randint(0, 4, (8,))
    plain = F.cross_entropy(layer(x), y).item()
    smooth = F.cross_entropy(layer(x), y, label_smoothing=0.2).item()
    assert smooth != pytest.approx(plain)
    opt = torch.optim.SGD(
        layer.parameters(), lr=0.0
    )  # lr 0: the loss reported is the loss computed
    ctx = StepContext(
        device=CPU, precision="fp32", env=DistEnv(), label_smoothing=0.2, progress=False
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    parts = OptimParts(opt, sched, make_scaler("fp32", CPU))
    stats = train_one_epoch(layer, [(x, y)], parts, ctx, StepGuard(ctx))
    assert stats.loss == pytest.approx(smooth, rel=1e-6) and stats.count == 8
    val_loss = evaluate(layer, [(x, y)], ctx).loss
    assert val_loss == pytest.approx(plain, rel=1e-6)


# ---------------------------------------------------------------- precision, layout, compile


def test_precision_resolution():
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)
    with autocast("bf16", CPU):
        assert (torch.randn(2, 3) @ torch.randn(3, 2)).dtype == torch.bfloat16
    assert not make_scaler("bf16", CPU).is_enabled()


@pytest.mark.parametrize("fast_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_the_cpus_bf16_support(monkeypatch, fast_bf16, expected):
    import transferlab.precision as precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert precision.resolve_precision("auto", CPU) == expected


def test_bf16_run_end_to_end(data_dir, tmp_path):
    assert _train(data_dir, tmp_path / "bf16", "--epochs", "1", "--precision", "bf16") == 0
    summary = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    assert summary["precision"] == "bf16" and math.isfinite(summary["test"]["loss"])


def test_channels_last_changes_layout_not_results():
    from transferlab.data.preprocess import to_float_normalized

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(name="timm:test_resnet", weights="none", mode="finetune"), num_classes=10
    ).eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    pp = model.preprocess
    nchw = model(to_float_normalized(x, pp.mean, pp.std, 40, channels_last=False))
    xc = to_float_normalized(x, pp.mean, pp.std, 40, channels_last=True)
    assert xc.shape == (4, 3, 40, 40) and xc.is_contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    assert torch.allclose(model(xc), nchw, atol=1e-4)


def test_layout_rule_channels_last_for_the_cnn_on_the_cpu_only():
    from transferlab.plan import use_channels_last

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert use_channels_last(
        True, 32, cpu
    )  # measured ~1.5x on the CPU (benchmarks/channels_last.py)
    assert not use_channels_last(True, 32, gpu)  # 32 px on the GPU: measured only in NCHW
    assert use_channels_last(True, 224, gpu) and use_channels_last(True, 224, cpu)
    assert not use_channels_last(False, 224, cpu)  # --no-channels-last wins


def test_cnn_trains_channels_last_on_the_cpu_with_the_seed_numbers():
    torch.manual_seed(0)
    ref = build_model(ModelConfig(name="cnn"), num_classes=100)
    cl = build_model(ModelConfig(name="cnn"), num_classes=100)
    cl.load_state_dict(ref.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 100, (8,))
    for m, inp in ((ref, x), (cl, x.contiguous(memory_format=torch.channels_last))):
        F.cross_entropy(m(inp), y).backward()
    assert torch.allclose(cl(x), ref(x), atol=1e-4)
    for (name, a), b in zip(ref.named_parameters(), cl.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-3), name


def test_compile_flag_wires_torch_compile(data_dir, tmp_path, monkeypatch):
    """--compile goes through torch.compile; the eager backend keeps this test fast on a CPU."""
    real, calls = torch.compile, []

    def eager_compile(model, **kwargs):
        calls.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    assert _train(data_dir, tmp_path / "c", "--epochs", "1", "--compile") == 0
    assert len(calls) == 1
    ckpt = load_checkpoint(tmp_path / "c" / "last.pt")
    assert not any(
        k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"]
    )  # saved unwrapped


@pytest.mark.slow
def test_compile_with_inductor(data_dir, tmp_path):
    """The real torch.compile (inductor) on the tiny CNN; about a minute of C++ compiling on CPU."""
    assert _train(data_dir, tmp_path / "c", "--epochs", "1", "--compile") == 0
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["epochs_run"] == 1


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn"), num_classes=100)
    opt = build_optimizer(model, OptimConfig(), 1.0)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    write_torch(
        tmp_path / "c.pt",
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": {"x": 1}},
    )
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
    ckpt = load_checkpoint(tmp_path / "c.pt")  # weights_only=True inside
    fresh = build_model(ModelConfig(name="cnn"), num_classes=100)
    fresh.load_state_dict(ckpt["model"])
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    opt2 = build_optimizer(fresh, OptimConfig(), 1.0)
    opt2.load_state_dict(ckpt["optimizer"])
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_run_checkpoints_load_with_weights_only(data_dir, tmp_path):
    assert _train(data_dir, tmp_path / "r", "--epochs", "2") == 0
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(tmp_path / "r" / name, map_location="cpu", weights_only=True)
        assert {
            "model",
            "optimizer",
            "scheduler",
            "scaler",
            "fit_state",
            "rng",
            "config",
            "classes",
        } <= set(ckpt)
        model = build_model(ModelConfig(name="cnn"), num_classes=100)
        model.load_state_dict(ckpt["model"])  # strict: the bare Classifier's keys
    last = load_checkpoint(tmp_path / "r" / "last.pt")
    assert last["fit_state"]["epoch"] == 2 and last["config"]["optim"]["epochs"] == 2
    # scratch: the whole CNN trains at --lr (no backbone lr divisor outside finetune/gradual)
    assert {g["lr"] for g in last["optimizer"]["param_groups"]} == {1e-3}


# ---------------------------------------------------------------- modes


def test_frozen_keeps_bn_in_eval_and_only_the_head_trains():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(name="timm:test_resnet", weights="none", mode="frozen"), num_classes=10
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, OptimConfig(lr=0.1), 10.0)
    model.train()
    assert model.head.training
    assert not any(m.training for m in model.backbone.modules())  # BN (and all) in eval
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,))).backward()
        opt.step()
    after = model.state_dict()
    for k, v in before.items():
        same = torch.equal(after[k], v)
        assert same if k.startswith("backbone.") else not same or "num_batches" in k, k


def test_frozen_run_without_cache_leaves_the_backbone_untouched(data_dir, tmp_path, resnet_weights):
    path, state = resnet_weights
    run = tmp_path / "frozen"
    assert (
        _train(
            data_dir,
            run,
            "--model",
            "timm:test_resnet",
            "--weights",
            str(path),
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--no-feature-cache",
        )
        == 0
    )
    ckpt = load_checkpoint(run / "last.pt")
    backbone = _backbone(ckpt["model"])
    for k, v in state.items():
        assert torch.equal(backbone[k], v), k  # weights and BN running stats alike
    assert set(_groups(ckpt)) == {"head", "head_no_decay"}
    summary = json.loads((run / "summary.json").read_text())
    head = 96 * 256 + 256 + 256 * 100 + 100  # the seed's head on test_resnet's 96 features
    assert summary["params"]["trainable"] == head
    assert summary["params"]["total"] == head + sum(
        v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k
    )


def test_finetune_trains_all_with_backbone_lr_divided(data_dir, tmp_path, resnet_weights):
    path, state = resnet_weights
    run = tmp_path / "ft"
    assert (
        _train(
            data_dir,
            run,
            "--model",
            "timm:test_resnet",
            "--weights",
            str(path),
            "--image-size",
            "40",
            "--mode",
            "finetune",
            "--epochs",
            "1",
            "--lr",
            "0.002",
            "--backbone-lr-div",
            "4",
            "--train-subset",
            "100",
        )
        == 0
    )
    ckpt = load_checkpoint(run / "last.pt")
    lrs = {name: g["lr"] for name, g in _groups(ckpt).items()}
    assert lrs == pytest.approx(
        {"backbone": 0.0005, "backbone_no_decay": 0.0005, "head": 0.002, "head_no_decay": 0.002}
    )
    backbone = _backbone(ckpt["model"])
    assert not torch.equal(backbone["conv1.0.weight"], state["conv1.0.weight"])
    assert not torch.equal(backbone["bn1.running_mean"], state["bn1.running_mean"])  # BN trains too
    summary = json.loads((run / "summary.json").read_text())
    assert summary["params"]["trainable"] == summary["params"]["total"]


# ---------------------------------------------------------------- gradual unfreezing and resume

GRADUAL = [
    "--model",
    "timm:test_resnet",
    "--image-size",
    "32",
    "--mode",
    "gradual",
    "--freeze-epochs",
    "1",
    "--epochs",
    "3",
    "--lr",
    "0.002",
    "--backbone-lr-div",
    "4",
    "--train-subset",
    "100",
]
STEPS_PER_EPOCH = 2  # 100 training images, batch 50


@pytest.fixture(scope="module")
def gradual_reference(tmp_path_factory, data_dir, resnet_weights):
    """An uninterrupted gradual run: 1 frozen epoch, then 2 unfrozen."""
    run = tmp_path_factory.mktemp("gradual") / "ref"
    assert _train(data_dir, run, *GRADUAL, "--weights", str(resnet_weights[0])) == 0
    return run


class _StopAfter:
    """A stop_requested hook: True from the n-th optimiser step on (as if SIGTERM came then)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1  # the loop asks once per step, and once more when stopping
        return self.calls >= self.n


@pytest.mark.parametrize("stop_step, phase", [(1, "frozen"), (2, "frozen"), (5, "unfrozen")])
def test_gradual_resume_matches_an_uninterrupted_run(
    data_dir, tmp_path, resnet_weights, gradual_reference, stop_step, phase
):
    """Stop mid-epoch before the unfreeze, at its boundary, and after it; resume with the CLI."""
    path, state = resnet_weights
    run = tmp_path / "resumed"
    args = build_parser().parse_args(
        [
            "train",
            "--data-dir",
            str(data_dir),
            "--run-dir",
            str(run),
            *TINY,
            *GRADUAL,
            "--weights",
            str(path),
        ]
    )
    with pytest.raises(TrainingStopped):
        run_experiment(config_from_args(args), stop_requested=_StopAfter(stop_step))
    stopped = load_checkpoint(run / "last.pt")
    fs = stopped["fit_state"]
    assert (fs["epoch"], fs["partial"]["step"], fs["phase"]) == (
        (stop_step - 1) // STEPS_PER_EPOCH,
        (stop_step - 1) % STEPS_PER_EPOCH + 1,
        phase,
    )
    groups = _groups(stopped)
    if phase == "frozen":  # only the head trains, the backbone is still the loaded one
        assert set(groups) == {"head", "head_no_decay"}
        assert all(torch.equal(_backbone(stopped["model"])[k], v) for k, v in state.items())
    else:
        assert groups["backbone"]["lr"] == pytest.approx(0.0005) and groups["head"][
            "lr"
        ] == pytest.approx(0.002)

    assert main(["train", "--resume", str(run), "--no-progress", "--device", "cpu"]) == 0

    ref = gradual_reference
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(run / "last.pt")
    assert b["fit_state"]["phase"] == "unfrozen" and b["fit_state"]["epoch"] == 3
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    assert [
        {k: v for k, v in g.items() if k != "params"} for g in a["optimizer"]["param_groups"]
    ] == [{k: v for k, v in g.items() if k != "params"} for g in b["optimizer"]["param_groups"]]
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(b["optimizer"]["state"][i][k], v), (i, k)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]

    def numbers(rows):
        return [
            {k: r[k] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")}
            for r in rows
        ]

    assert numbers(metrics_rows(run)) == numbers(metrics_rows(ref))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    for split in ("train", "val", "test"):
        assert sb[split] == sa[split]
    assert (
        sb["best_epoch"] == sa["best_epoch"]
        and sb["fit_state"]["best_val_acc"] == sa["fit_state"]["best_val_acc"]
    )


def test_gradual_unfreezes_after_freeze_epochs(gradual_reference, resnet_weights):
    _, state = resnet_weights
    rows = metrics_rows(gradual_reference)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    ckpt = load_checkpoint(gradual_reference / "last.pt")
    assert ckpt["fit_state"]["phase"] == "unfrozen"
    assert set(_groups(ckpt)) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert not torch.equal(_backbone(ckpt["model"])["conv1.0.weight"], state["conv1.0.weight"])
    summary = json.loads((gradual_reference / "summary.json").read_text())
    assert summary["params"]["trainable"] == summary["params"]["total"]
