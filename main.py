"""Run unlearning experiments over several seeds and compare them with the retrain oracle.

The command line is in `cli/main.py`; this file only runs it (see README.md). It runs that
module as the program rather than importing it: a worker process of a sweep imports this file
again (``multiprocessing`` with the spawn method) and should get nothing from it, not the
command line's imports (report, plots, tuning, SLURM), which it does not use.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("cli.main", run_name="__main__")
