"""Penultimate-layer features of every checkpoint in a folder, on one fixed sample of the pool. (command line; the code is in `analysis/features.py`)."""

import sys

from analysis import features as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
