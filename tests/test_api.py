"""The Python API: options derived from the config fields (as the CLI's), Runs read from files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import transferlab as tl
from transferlab import api, config
from transferlab.cli import build_parser, config_from_args, main
from transferlab.config import COMPARE, TRAIN, flag_of, keyword_of
from transferlab.predict import load_run_model, predict_files


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_cifar):
    """One tiny CNN run through the API (2 epochs, 300 train images, CPU)."""
    out = tmp_path_factory.mktemp("api") / "cnn"
    return api.train(
        model="cnn",
        epochs=2,
        data_dir=str(tiny_cifar),
        val_size=50,
        batch_size=50,
        run_dir=str(out),
        progress=False,
        device="cpu",
        seed=1,
    )


def test_import_is_cheap_and_lazy():
    code = (
        "import sys, logging, transferlab as t; assert 'torch' not in sys.modules, 'torch';"
        "assert not logging.getLogger().handlers;"
        "assert t.load_run.__module__ == 'transferlab.api';"
        "assert t.api.train.__module__ == 'transferlab.api';"
        "assert t.Run.__module__ == 'transferlab.results';"
        "assert issubclass(t.UserError, Exception)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {f for a in sub.choices[command]._actions for f in a.option_strings}


@pytest.mark.parametrize(("command", "options"), [("train", TRAIN), ("compare", COMPARE)])
def test_every_cli_flag_is_a_keyword_and_back(command, options):
    keywords = options.keywords()
    flags = {flag_of(k) for k in keywords}
    # every keyword is a flag, but a --no-x field's own name (progress=False)
    assert {keywords[keyword_of(f)].field.default for f in flags - _flags(command)} <= {True}
    assert _flags(command) - flags <= {"-h", "--help", "--preset", "--resume"}
    for name in ("model", "mode", "epochs", "data", "data_dir", "image_size", "no_channels_last"):
        assert name in TRAIN.keywords()


def test_options_match_cli_config():
    argv = [
        "train",
        "--model",
        "resnet18",
        "--max-epochs",
        "3",
        "--image-size",
        "64",
        "--no-channels-last",
        "--flip",
        "--lr",
        "0.01",
        "--data-dir",
        "somewhere",
    ]
    cli_cfg = config_from_args(build_parser().parse_args(argv))
    api_cfg = api.build_config(
        model="resnet18",
        max_epochs=3,
        image_size=64,
        no_channels_last=True,
        flip=True,
        lr=0.01,
        data_dir="somewhere",
    )
    assert api_cfg == cli_cfg
    assert api_cfg.run.channels_last is False and api_cfg.model.mode == "frozen"
    assert api_cfg.optim.epochs == 3
    assert api.build_config(progress=False).run.progress is False
    assert api.build_config(channels_last=False) == api.build_config(no_channels_last=True)


PRESET = """
optim: {optimizer: sgd, lr: 0.05, epochs: 7}
data: {flip: true}
"""


def test_layers_defaults_preset_flags_on_cli_and_api(tmp_path):
    """defaults < preset < flags: a flag beats the preset, an unset flag keeps the preset, and a
    field neither sets keeps its default. The same for the CLI and the API."""
    preset = tmp_path / "p.yaml"
    preset.write_text(PRESET)
    cli = config_from_args(
        build_parser().parse_args(["train", "--preset", str(preset), "--lr", "0.2"])
    )
    via_api = api.build_config(preset=str(preset), lr=0.2)
    via_config = api.build_config(config=preset, lr=0.2)
    for cfg in (cli, via_api, via_config):
        assert cfg.optim.lr == 0.2  # the flag beats the preset
        assert (cfg.optim.optimizer, cfg.optim.epochs, cfg.data.flip) == ("sgd", 7, True)
        assert cfg.optim.batch_size == 200 and cfg.model.name == "cnn"  # neither: the default
    assert cli == via_api == via_config
    plain = config_from_args(build_parser().parse_args(["train", "--preset", str(preset)]))
    assert plain.optim.lr == 0.05  # no flag: the preset's value
    with pytest.raises(tl.UserError, match="not both"):
        api.build_config(config=preset, preset="cnn-best")


def test_unknown_keyword_lists_valid_ones():
    with pytest.raises(tl.UserError, match=r"unknown option\(s\) epoch; valid: .*epochs"):
        api.train(epoch=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": "ten"}, r"--epochs \(epochs=\) must be an int; got 'ten'"),
        ({"epochs": 2.5}, "must be an int"),
        ({"epochs": True}, "must be an int"),
        ({"lr": "fast"}, r"--lr \(lr=\) must be a number"),
        ({"lr": float("inf")}, "must be a finite number"),
        ({"flip": "yes"}, "--flip .* must be True or False"),
        ({"model": 3}, "--model .* must be a string"),
        ({"progress": 0}, "progress= must be True or False"),
        ({"mode": "warm"}, "--mode must be one of"),  # the config's own check, as on the CLI
    ],
)
def test_wrong_types_are_user_errors(kwargs, match):
    with pytest.raises(tl.UserError, match=match):
        api.train(**kwargs)


def test_same_message_as_cli(capsys, tmp_path):
    with pytest.raises(tl.UserError) as e:
        api.train(
            model="cnn",
            data_dir=str(tmp_path / "none"),
            run_dir=str(tmp_path / "r"),
            progress=False,
        )
    assert (
        main(
            [
                "train",
                "--model",
                "cnn",
                "--data-dir",
                str(tmp_path / "none"),
                "--run-dir",
                str(tmp_path / "r2"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == f"transferlab: error: {e.value}"


def test_load_run_names_the_missing_file(tmp_path, run):
    with pytest.raises(tl.UserError, match="not a folder"):
        tl.load_run(tmp_path / "nope")
    (tmp_path / "config.yaml").write_text("data: {}\n")
    with pytest.raises(tl.UserError, match="summary.json is missing"):
        tl.load_run(tmp_path)


def test_run_reads_its_files(run):
    again = tl.load_run(run.dir)
    assert again.summary.to_dict() == json.loads((run.dir / "summary.json").read_text())
    assert again.config["model"]["name"] == "cnn" and again.config["optim"]["epochs"] == 2
    df = again.metrics
    assert list(df["epoch"]) == [1, 2] and {"train_loss", "val_acc", "lr", "train_img_s"} <= set(
        df.columns
    )
    fig = again.plot()
    assert len(fig.axes) == 2 and len(fig.axes[1].lines) == 2
    card = again._repr_html_()
    assert (
        "cnn" in card
        and f"{100 * run.summary.test['acc']:.2f}%" in card
        and "data:image/png" in card
    )


def test_train_writes_the_report(run):
    assert (run.dir / "report.html").is_file()  # run.report defaults to True
    md, html = run.report()
    assert md.name == "report.md" and html.is_file()


def test_resume_extends_the_budget(tiny_cifar, tmp_path):
    first = api.train(
        model="cnn",
        epochs=1,
        data_dir=str(tiny_cifar),
        val_size=50,
        no_report=True,
        run_dir=str(tmp_path / "r"),
        progress=False,
        device="cpu",
    )
    assert list(first.metrics["epoch"]) == [1]
    again = api.train(resume=first.dir, epochs=2, progress=False)
    assert again.dir == first.dir and list(again.metrics["epoch"]) == [1, 2]


def test_config_roundtrip_and_resume(run, tmp_path):
    with pytest.raises(tl.UserError, match="drop --lr"):
        api.train(resume=run.dir, lr=0.1, epochs=3)
    cfg = api.build_config(config=run.dir / "config.yaml", epochs=3)
    assert cfg.optim.epochs == 3 and cfg.model.name == "cnn"


def test_predict_matches_cli_and_reports_bad_images(run, tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png = tmp_path / "a.png"
    Image.fromarray(arr).save(png)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    results = run.predict(
        [png, Image.fromarray(arr), chw, chw.float() / 255, bad, torch.zeros(2, 2)], top_k=3
    )
    assert len(results) == 6
    rm = load_run_model(run.dir)
    cli = predict_files(rm, [png], 3, 8, torch.device("cpu"))[0]["top"]
    want = [(t["class"], t["prob"]) for t in cli]
    for r in results[:4]:  # path, PIL, uint8 tensor, float tensor: the same pixels, the same answer
        assert [(t["class"], t["probability"]) for t in r["top"]] == want
        assert r["class"] == want[0][0] and rm.classes[r["index"]] == r["class"]
    assert "error" in results[4] and results[4]["image"] == str(bad)
    assert "error" in results[5] and "expected one image" in results[5]["error"]
    nan = chw.float() / 255
    nan[0, 0, 0] = float("nan")  # NaN passed every range check and became black pixels
    (refused,) = run.predict(nan)
    assert "NaN" in refused["error"] and "class" not in refused


def test_export_returns_the_checked_file(run, tmp_path):
    path = run.export("torchscript", tmp_path / "m.pt")
    assert path.is_file() and (tmp_path / "m.pt.json").is_file()
    with pytest.raises(tl.UserError, match="--format must be one of"):
        run.export("tflite")


def test_compare_rejects_train_only_options():
    with pytest.raises(tl.UserError, match=r"unknown option\(s\) model"):
        api.compare(model="cnn")
    with pytest.raises(tl.UserError, match=r"--chase-patience \(chase_patience=\) must be"):
        api.compare(chase_patience="five")


def test_study_runs_cells_and_reads_the_csv(tiny_cifar, tmp_path):
    with pytest.raises(tl.UserError, match=r"unknown option\(s\) model"):
        api.study("cnn:scratch", model="cnn", run_dir=tmp_path / "s0")
    s = api.study(
        "cnn:scratch",
        per_class="1",
        seeds=1,
        run_dir=tmp_path / "s",
        min_steps=1,
        data_dir=str(tiny_cifar),
        val_size=50,
        epochs=1,
        progress=False,
        device="cpu",
    )
    df = s.table()
    assert len(df) == 1 and not s.failed and "transferlab study" in s._repr_html_()


def test_a_new_field_is_a_flag_and_a_keyword(monkeypatch):
    """Adding a field to a config dataclass is the one step: the CLI flag (with its help and
    default), the API keyword, the coercion and the layering follow from it."""

    @dataclasses.dataclass
    class NewRunConfig(config.RunConfig):
        shiny_level: int = config.opt(3, "a brand-new option")
        sparkle: bool = config.opt(True, "sparkles")

    monkeypatch.setitem(config.SECTIONS, "run", NewRunConfig)
    assert {"--shiny-level", "--no-sparkle"} <= _flags("train")
    args = build_parser().parse_args(["train", "--shiny-level", "5", "--no-sparkle"])
    cfg = config_from_args(args)
    assert (cfg.run.shiny_level, cfg.run.sparkle) == (5, False)
    assert config_from_args(build_parser().parse_args(["train"])).run.shiny_level == 3
    assert api.build_config(shiny_level=7, sparkle=False).run.shiny_level == 7
    assert api.build_config(no_sparkle=True).run.sparkle is False
    with pytest.raises(tl.UserError, match=r"--shiny-level \(shiny_level=\) must be an int"):
        api.build_config(shiny_level="lots")
