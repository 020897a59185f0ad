"""Tiny synthetic data for CI's README-install stage, in the real file formats.

WORK/cifar-100-python/ (1,000 train and 200 test images, CIFAR-100's pickle layout) and
WORK/photo.png (a 40x48 px RGB image to predict).

Usage:
    python .ci/tiny_data.py /tmp/work
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.data.cifar import write_cifar_like


def main(work: Path) -> None:
    write_cifar_like(work, n_train=1000, n_test=200)
    px = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(px).save(work / "photo.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
