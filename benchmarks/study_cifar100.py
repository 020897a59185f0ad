"""The issue-14 acceptance study on real CIFAR-100, through the study CLI's own parser and handler.

Runs ``transferlab study`` (studies/cli.py: ``add_parsers`` + ``cmd_study``) in-process, so it
works before the main CLI registers the command. Resumable: rerun the same command after a kill.

Usage:
    TRANSFERLAB_CACHE_DIR=/tmp/tl-cache nice -n 5 python benchmarks/study_cifar100.py \\
        --data-dir ../shared/datasets --run-dir /tmp/study-cifar100 \\
        --arms timm:tf_efficientnet_lite0:frozen,cnn:scratch --per-class 4,16,64,all --seeds 3
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv: list[str]) -> int:
    from transferlab.errors import UserError
    from transferlab.studies.cli import COMMANDS, add_parsers

    parser = argparse.ArgumentParser(prog="study_cifar100")
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", *argv])
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    t0 = time.perf_counter()
    try:
        code = COMMANDS["study"](args)
    except UserError as e:
        sys.stderr.write(f"study_cifar100: error: {e}\n")
        return 2
    logging.getLogger("study_cifar100").info(
        "study wall time %.1f s (exit %d)", time.perf_counter() - t0, code
    )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
