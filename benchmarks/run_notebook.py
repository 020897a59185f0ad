"""Execute examples/seed_study.ipynb with nbclient; outputs stay out of the repo; time the cells.

The notebook reads its parameters from TRANSFERLAB_EXAMPLE_* environment variables (see its
first code cell). Real-data run of benchmarks/RESULTS.md (issue 15):

    TRANSFERLAB_EXAMPLE_SUBSET=5000 TRANSFERLAB_EXAMPLE_DATA_DIR=../shared/datasets \
    TRANSFERLAB_EXAMPLE_TEST_SUBSET=2000 TRANSFERLAB_EXAMPLE_RUNS=/tmp/real/runs \
    nice -n 5 python benchmarks/run_notebook.py --out /tmp/real/seed_study.executed.ipynb
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "seed_study.ipynb"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="where to write the executed notebook")
    p.add_argument("--cwd", default=".", help="working directory of the kernel")
    args = p.parse_args()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t0 = time.perf_counter()
    try:
        nbclient.NotebookClient(
            nb,
            timeout=3600,
            kernel_name="python3",
            record_timing=True,
            resources={"metadata": {"path": args.cwd}},
        ).execute()
    finally:
        nbformat.write(nb, args.out)
        print(f"total {time.perf_counter() - t0:.1f} s")
        for i, cell in enumerate(nb.cells):
            t = cell.metadata.get("execution", {})
            if "iopub.execute_input" in t and "shell.execute_reply" in t:
                a, b = (
                    datetime.fromisoformat(t[k].replace("Z", "+00:00"))
                    for k in ("iopub.execute_input", "shell.execute_reply")
                )
                first = cell.source.splitlines()[0][:60]
                print(f"cell {i:2d}: {(b - a).total_seconds():8.1f} s  {first}")


if __name__ == "__main__":
    main()
