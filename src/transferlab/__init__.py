"""transferlab: how much does a pretrained network buy you over a CNN trained from scratch?

Usage:
    $ transferlab compare --data-dir ../shared/datasets
    $ python -m transferlab train --model cnn --epochs 10
"""

__version__ = "0.1.0"
