"""Studies: arms x data sizes x seeds with their costs (``transferlab study``), and backbone ranking
before training (``transferlab rank``).

Usage:
    from transferlab.studies import is_study_dir, run_study, write_study_report
    from transferlab.studies.grid import make_grid

    result = run_study(make_grid(["cnn:scratch"], "4,all", seeds=2), "/tmp/study")
"""

from transferlab.studies.report import write_study_report
from transferlab.studies.runner import run_study
from transferlab.studies.table import is_study_dir

__all__ = ["is_study_dir", "run_study", "write_study_report"]
