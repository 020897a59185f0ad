"""Entry point for ``python -m transferlab`` (and for ``torchrun -m transferlab``)."""

from transferlab.entry import main

if __name__ == "__main__":
    raise SystemExit(main())
