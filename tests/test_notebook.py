"""examples/seed_study.ipynb runs top to bottom (nbclient) on a tiny CIFAR-format dataset.

The notebook runs in a child process in its own session, so it depends on no other test and on
no test order (the mid-suite crashes once blamed on the order were OpenVINO's signal stack:
transferlab/sigstack.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "seed_study.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_on_tiny_data(tmp_path, monkeypatch):
    from transferlab.data.cifar import write_cifar_like

    data = write_cifar_like(tmp_path / "data", n_train=300, n_test=60)
    env = {
        "SUBSET": "200",
        "DATA_DIR": str(data),
        "RUNS": str(tmp_path / "runs"),
        "EPOCHS": "2",
        "BACKBONE": "resnet18",
        "WEIGHTS": "none",
        "IMAGE_SIZE": "32",
        "VAL_SIZE": "50",
        "PROGRESS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(f"TRANSFERLAB_EXAMPLE_{key}", value)
    monkeypatch.setenv("TRANSFERLAB_CACHE_DIR", str(tmp_path / "cache"))
    # nbclient runs in a child process: its zmq/asyncio loop and the kernel's sockets stay out of
    # the pytest process (which, after hundreds of torch tests, once crashed inside it in CI)
    out = tmp_path / "executed.ipynb"
    script = (
        "import sys, nbformat, nbclient; nb = nbformat.read(sys.argv[1], as_version=4); "
        "nbclient.NotebookClient(nb, timeout=300, kernel_name='python3', record_timing=True, "
        "resources={'metadata': {'path': sys.argv[3]}}).execute(); "
        "nbformat.write(nb, sys.argv[2])"
    )
    t0 = time.perf_counter()
    # its own session too: jupyter_client signals the kernel's process group on shutdown, and
    # that group must never be pytest's
    proc = subprocess.run(
        [sys.executable, "-c", script, str(NOTEBOOK), str(out), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"notebook executed in {time.perf_counter() - t0:.1f} s")
    nb = nbformat.read(out, as_version=4)
    for i, c in enumerate(nb.cells):
        t = c.metadata.get("execution", {})
        if "iopub.execute_input" in t:
            print(i, t["iopub.execute_input"], t.get("shell.execute_reply"))
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert html.count("transferlab run:") == 2  # the two Run cards
    pngs = sum("image/png" in o.get("data", {}) for o in outputs)
    assert pngs >= 4 + 3  # 2 curves, the comparison, the image grid; 3 Grad-CAM overlays
    assert (tmp_path / "runs" / "frozen" / "model.onnx").is_file()
    assert (tmp_path / "runs" / "frozen" / "report.html").is_file()
    assert len(list((tmp_path / "runs" / "explain").glob("*_gradcam.png"))) == 3
