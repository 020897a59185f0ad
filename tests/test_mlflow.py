"""MLflow tracking: a tiny run logged into a temporary local store and read back; failures."""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest

from transferlab import api
from transferlab.errors import UserError
from transferlab.report import mlflow_log
from transferlab.report.mlflow_log import check_tracking_available, log_run

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_cifar):
    out = tmp_path_factory.mktemp("mlflow") / "cnn"
    run = api.train(
        model="cnn",
        epochs=3,
        data_dir=str(tiny_cifar),
        val_size=50,
        batch_size=50,
        run_dir=str(out),
        progress=False,
        device="cpu",
    )
    run.export("torchscript")
    return run.dir


def test_log_run_reads_back(run_dir, tmp_path, monkeypatch):
    store = tmp_path / "store"
    run_id = log_run(run_dir, f"mlflow:{store}")
    assert run_id and json.loads((run_dir / "mlflow.json").read_text())["run_id"] == run_id
    uri = f"sqlite:///{store.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what search_runs reads (no global state)
    df = mlflow.search_runs(experiment_names=["transferlab"])
    assert list(df["run_id"]) == [run_id] and df.loc[0, "status"] == "FINISHED"
    assert df.loc[0, "params.model.name"] == "cnn" and df.loc[0, "params.optim.epochs"] == "3"
    assert df.loc[0, "tags.mlflow.runName"] == "cnn"
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    header, *rows = (run_dir / "metrics.csv").read_text().splitlines()
    for key in ("train_loss", "val_acc", "lr", "train_img_s"):
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [1, 2, 3], key
    col = header.split(",").index("val_acc")
    want = [float(r.split(",")[col]) for r in rows]
    assert [m.value for m in client.get_metric_history(run_id, "val_acc")] == want
    summary = json.loads((run_dir / "summary.json").read_text())
    assert df.loc[0, "metrics.test_acc_final"] == pytest.approx(summary["test"]["acc"])
    names = {a.path for a in client.list_artifacts(run_id)}
    want = {"config.yaml", "summary.json", "metrics.csv", "curves.png", "report.html", "model"}
    assert want <= names
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {
        "model/model.torchscript.pt",
        "model/model.torchscript.pt.json",
    }


def test_unreachable_server_warns_after_one_retry_and_training_goes_on(
    tiny_cifar, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(mlflow_log, "RETRY_WAIT_S", 0.0)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    calls = []
    real = mlflow_log._log_once
    monkeypatch.setattr(mlflow_log, "_log_once", lambda *a: calls.append(1) or real(*a))
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="transferlab.report.mlflow_log"):
        run = api.train(
            model="cnn",
            epochs=1,
            data_dir=str(tiny_cifar),
            val_size=50,
            run_dir=str(tmp_path / "r"),
            progress=False,
            device="cpu",
            track="mlflow:http://127.0.0.1:9",
        )
    assert run.summary.epochs_run == 1 and (run.dir / "report.html").is_file()
    assert not (run.dir / "mlflow.json").exists()
    assert len(calls) == 2 and time.perf_counter() - t0 < 60
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "127.0.0.1:9" in warnings[0].getMessage()


def test_missing_mlflow_is_one_line_error_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(UserError, match=r"pip install 'transferlab\[mlflow\]'") as e:
        check_tracking_available("mlflow")
    assert "\n" not in str(e.value)
    check_tracking_available("")  # tracking off: nothing to check
    with pytest.raises(UserError, match="transferlab.mlflow"):  # before any data is read
        api.train(model="cnn", track="mlflow", data_dir=str(tmp_path / "no-data"))


def test_not_a_run(tmp_path):
    with pytest.raises(UserError, match="summary.json is missing"):
        log_run(tmp_path, "mlflow")
