"""A results section for a run folder: ``report.md`` and a self-contained ``report.html``. (command line; the code is in `analysis/report.py`)."""

import sys

from analysis import report as _impl

if __name__ == "__main__":
    sys.exit(_impl.main())
