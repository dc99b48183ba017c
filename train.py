"""Train a base model, or a retrain-from-scratch oracle when a forget set is given.

The command line is in `cli/train.py`; this file only runs it (see README.md).
"""

from cli import train as _cli

if __name__ == "__main__":
    _cli.main()
