"""A real one-node SLURM cluster for the tests, started by ``.ci/slurm_up.sh``.

The cluster needs root and the Debian packages slurm-wlm and munge (the script installs them),
so it starts only when ``CI=true`` or ``UNLEARN_TEST_SLURM=1`` (as root, or through
password-less ``sudo``); otherwise tests that use the fixture are skipped. The daemons are
stopped at the end of the session by ``.ci/slurm_down.sh`` unless they were already running.
A test module uses it with ``from slurm_cluster import slurm_cluster_fixture  # noqa: F401``
and a ``slurm_cluster`` argument (the partition name).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
UP = REPO_ROOT / ".ci" / "slurm_up.sh"
DOWN = REPO_ROOT / ".ci" / "slurm_down.sh"
PID_DIR = Path("/run/slurm-ci")  # where slurm_up.sh keeps the pid files of its daemons
PARTITION = "debug"


def wanted() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("UNLEARN_TEST_SLURM") == "1"


def running_from_script() -> bool:
    """Whether slurm_up.sh's slurmctld is already running (then the session leaves it up)."""
    pid_file = PID_DIR / "slurmctld.pid"
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _script(path: Path) -> subprocess.CompletedProcess[str]:
    # the daemons run as root; a CI user with password-less sudo gets them through sudo
    cmd = [str(path)] if os.geteuid() == 0 else ["sudo", "-n", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[str]:
    if not wanted():
        pytest.skip("a real SLURM cluster starts only with CI=true or UNLEARN_TEST_SLURM=1 (root)")
    was_up = running_from_script()
    up = _script(UP)
    if up.returncode != 0:
        if not was_up:
            _script(DOWN)  # whatever half of the cluster did start
        pytest.fail(f"{UP.name} failed:\n{up.stdout}{up.stderr}", pytrace=False)
    try:
        yield PARTITION
    finally:
        if not was_up:
            down = _script(DOWN)
            if down.returncode != 0:
                print(f"{DOWN.name} failed:\n{down.stdout}{down.stderr}")
