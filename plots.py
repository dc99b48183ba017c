"""Evaluation plots of a run folder: what the unlearning did to losses, predictions and classes. (command line; the code is in `analysis/plots.py`)."""

import sys

from analysis import plots as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
