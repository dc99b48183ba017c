"""t-SNE maps of penultimate features: base, unlearned and oracle side by side (command line; the code is in `analysis/tsne.py`)."""

import sys

from analysis import tsne as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
