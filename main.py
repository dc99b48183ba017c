"""Run unlearning experiments over several seeds and compare them with the retrain oracle.

The command line is in `cli/main.py`; this file only runs it (see README.md).
"""

import sys

from cli import main as _cli

if __name__ == "__main__":
    sys.exit(_cli.main())
