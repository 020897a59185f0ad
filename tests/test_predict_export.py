"""predict and export through the real CLI, on a cnn trained 1 epoch on a tiny PNG folder."""

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import transferlab as tl
from conftest import write_png_tree
from transferlab.cli import main
from transferlab.data.cifar import load_cifar100, write_cifar_like
from transferlab.predict import load_run_model


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """(run dir, data root): cnn, 1 epoch, 3 colour classes of 12 PNGs each."""
    tmp = tmp_path_factory.mktemp("pe")
    root = write_png_tree(tmp / "data", {"red": 12, "green": 12, "blue": 12})
    run = tmp / "run"
    rc = main(
        [
            "train",
            "--data",
            f"folder:{root}",
            "--model",
            "cnn",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--num-workers",
            "0",
            "--val-frac",
            "0.2",
            "--test-frac",
            "0.2",
            "--run-dir",
            str(run),
            "--no-progress",
            "--device",
            "cpu",
            "--precision",
            "fp32",
        ]
    )
    assert rc == 0
    return run, root


def test_predict_table_json_and_a_bad_file(folder_run, tmp_path, capsys):
    run, root = folder_run
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    files = [str(root / "red" / "000.png"), str(bad), str(root / "blue")]
    rc = main(
        [
            "predict",
            str(run),
            *files,
            "--top-k",
            "2",
            "--json",
            "--batch-size",
            "5",
            "--device",
            "cpu",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0  # some files predicted
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 + 12  # red/000.png, the bad file, blue/*.png (folder expanded)
    assert "error" in lines[1] and lines[1]["file"] == str(bad)
    good = [r for r in lines if "top" in r]
    assert len(good) == 13 and all(len(r["top"]) == 2 for r in good)
    assert all(r["top"][0]["prob"] >= r["top"][1]["prob"] for r in good)
    assert {t["class"] for r in good for t in r["top"]} <= {"red", "green", "blue"}
    assert "broken.jpg" in err and "1 failed" in err

    rc = main(["predict", str(run), str(root / "green" / "001.png"), "--top-k", "3"])
    out, _ = capsys.readouterr()
    assert (
        rc == 0 and "001.png" in out and out.count("(") == 3
    )  # table: 3 classes with probabilities

    rc = main(["predict", str(run), str(bad)])
    assert rc == 1  # nothing predicted


def test_predict_matches_the_models_test_predictions(folder_run):
    """predict's preprocessing is the training pipeline's: same logits for a test file."""
    import numpy as np

    from transferlab.data.folder import load_image
    from transferlab.data.preprocess import to_float_normalized
    from transferlab.predict import predict_files

    run, _ = folder_run
    rm = load_run_model(run)
    manifest = json.loads((run / "data_manifest.json").read_text())
    preds = np.load(run / "test_predictions.npz")
    files = [manifest["test"]["paths"][i] for i in range(3)]
    from pathlib import Path

    res = predict_files(rm, [Path(f) for f in files], 1, 2, torch.device("cpu"))
    assert [rm.classes.index(r["top"][0]["class"]) for r in res] == preds["pred"][:3].tolist()
    x = to_float_normalized(
        torch.stack([load_image(f, rm.image_size) for f in files]), rm.mean, rm.std, None
    )
    assert torch.allclose(
        rm.model(x).softmax(1).max(1).values, torch.tensor(preds["prob"][:3]), atol=1e-4
    )


def test_predict_bad_run_dir_is_a_user_error(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "x.png"]) == 2
    assert "best.pt" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_checks_against_pytorch(folder_run, tmp_path, capsys, fmt):
    run, _ = folder_run
    out = tmp_path / f"m.{fmt}"
    rc = main(["export", str(run), "--format", fmt, "--output", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "max abs diff" in stdout and "OK" in stdout
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["classes"] == ["blue", "green", "red"] and meta["image_size"] == 32
    assert meta["check"]["ok"] and meta["check"]["max_abs_diff"] <= 1e-4
    # the exported graph folds the normalisation in: float [0, 1] in, the run's logits out
    rm = load_run_model(run)
    x = torch.rand(2, 3, 32, 32)
    from transferlab.data.preprocess import to_float_normalized

    want = rm.model(to_float_normalized((x * 255).round().to(torch.uint8), rm.mean, rm.std, None))
    if fmt == "torchscript":
        got = torch.jit.load(str(out))((x * 255).round() / 255)
    else:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"images": ((x * 255).round() / 255).numpy()})[0])
    assert torch.allclose(got, want, atol=1e-4)


def test_export_check_fails_above_tolerance(folder_run, tmp_path, capsys, monkeypatch):
    """A file that disagrees with PyTorch (as an exporter bug would make it) fails with exit 1."""
    import transferlab.export as ex

    real = ex.export_onnx

    def buggy_export(wrapped, size, path, meta):
        with torch.no_grad():
            wrapped.model.head[-1].bias.add_(0.01)  # the file gets perturbed logits...
        real(wrapped, size, path, meta)
        with torch.no_grad():
            wrapped.model.head[-1].bias.sub_(0.01)  # ...PyTorch keeps the true ones

    monkeypatch.setattr(ex, "export_onnx", buggy_export)
    rc = main(
        ["export", str(folder_run[0]), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]
    )
    out, err = capsys.readouterr()
    assert rc == 1 and "FAILED" in out and "export check failed" in err
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert not meta["check"]["ok"] and meta["check"]["max_abs_diff"] == pytest.approx(
        0.01, rel=1e-2
    )


def test_a_cifar_runs_test_images_as_png_files_predict_as_the_run_did(tmp_path, capsys):
    """Issue 24 item 8: a CIFAR run resized the whole 32 px image (no crop); predict cropped."""
    data = write_cifar_like(tmp_path / "data", n_train=100, n_test=200, n_classes=10)
    weights = tmp_path / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    run = tmp_path / "run"
    args = ["train", "--data-dir", str(data), "--val-size", "20", "--model", "resnet18"]
    args += ["--weights", str(weights), "--image-size", "48", "--epochs", "1"]
    args += ["--device", "cpu", "--precision", "fp32", "--engine", "torch"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--run-dir", str(run), "--no-progress"]
    assert main(args) == 0
    test = load_cifar100(data, False, 0, 20).test
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    files = []
    for i, img in enumerate(test.images[:200]):
        files.append(pngs / f"{i:03d}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(files[-1])
    npz = np.load(run / "test_predictions.npz")
    want, want_p = npz["pred"][:200], npz["prob"][:200]
    classes = load_run_model(run).classes
    capsys.readouterr()  # the training's output
    assert main(["predict", str(run), *map(str, files), "--json", "--device", "cpu"]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    cli_pred = np.array([classes.index(r["top"][0]["class"]) for r in cli])
    api_pred = np.array([r["index"] for r in tl.load_run(run).predict(files, device="cpu")])
    assert (cli_pred == want).mean() >= 0.99
    assert (api_pred == want).mean() >= 0.99
    cli_p = np.array([r["top"][0]["prob"] for r in cli])  # the very logits, not just the argmax
    assert (np.abs(cli_p - want_p) < 1e-4).mean() >= 0.99
