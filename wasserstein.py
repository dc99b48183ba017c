"""Class x class Wasserstein distances between feature clouds, per model, and their changes. (command line; the code is in `analysis/wasserstein.py`)."""

import sys

from analysis import wasserstein as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
