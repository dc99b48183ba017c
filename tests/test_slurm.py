"""The SLURM launcher (running/slurm.py): settings, and job arrays on a real one-node cluster.

The cluster tests need ``CI=true`` or ``UNLEARN_TEST_SLURM=1`` (see tests/slurm_cluster.py);
the settings tests run everywhere.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import slurm_cluster_fixture  # noqa: F401 (registers the fixture)

from core.errors import UserError
from running.slurm import SlurmLauncher, SlurmSettings, parse_extra, time_minutes

TESTS = Path(__file__).resolve().parent  # on the jobs' PYTHONPATH: they import this module


def square(out: str, i: int, hold: str) -> int:
    """Task i: writes i*i to ``out/i.txt`` and returns it; waits while the file `hold` exists."""
    deadline = time.monotonic() + 120
    while hold and Path(hold).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    Path(out, f"{i}.txt").write_text(f"{i * i}\n")
    return i * i


def fail_if_odd(i: int) -> int:
    if i % 2:
        raise ValueError(f"odd task {i}")
    return i


def launcher(run_dir: Path, partition: str) -> SlurmLauncher:
    settings = SlurmSettings(partition=partition, time="5", array_parallelism=4)
    return SlurmLauncher(settings, run_dir, job_name="test", pythonpath=[TESTS])


def wait_until(fn: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not fn():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


# ---- settings: no cluster needed ----


def test_time_formats() -> None:
    assert time_minutes("90") == 90
    assert time_minutes("10:30") == 11  # M:S, rounded up to whole minutes
    assert time_minutes("1:30:00") == 90
    assert time_minutes("1-2") == 26 * 60
    assert time_minutes("2-00:00:00") == 2880
    assert time_minutes("0") is None
    assert time_minutes("1h") is None


def test_settings_from_json_give_exact_sbatch_parameters() -> None:
    s = SlurmSettings.from_mapping(
        {
            "name": "slurm",
            "partition": "gpu",
            "time": "2:00:00",
            "gpus_per_task": 1,
            "cpus_per_task": 8,
            "mem": "32G",
            "account": "lab",
            "qos": "high",
            "array_parallelism": 16,
            "extra": {"constraint": "a100", "exclusive": True},
        },
        "cluster.json: ",
    )
    assert s.sbatch_parameters() == {
        "time": 120,
        "cpus_per_task": 8,
        "array_parallelism": 16,
        "additional_parameters": {"constraint": "a100", "exclusive": True},
        "partition": "gpu",
        "mem": "32G",
        "account": "lab",
        "qos": "high",
        "gpus_per_task": 1,
    }
    assert SlurmSettings().sbatch_parameters() == {
        "time": 60,
        "cpus_per_task": 1,
        "array_parallelism": 64,
        "additional_parameters": {},
    }
    assert parse_extra(["--mail-type=END", "requeue"]) == {"mail-type": "END", "requeue": True}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"partiton": "gpu"}, "key 'partiton' is unknown; use one of partition, time, "),
        ({"mem": "16 GB"}, "key 'mem' (--slurm-mem): '16 GB' is invalid; expected memory"),
        ({"time": "1h"}, "key 'time' (--slurm-time): '1h' is invalid"),
        ({"gpus_per_task": -1}, "key 'gpus_per_task' (--slurm-gpus-per-task): -1 is invalid"),
        ({"array_parallelism": 0}, "(--slurm-array-parallelism): 0 is invalid"),
        ({"extra": ["time=5"]}, "'time' has its own setting; use --slurm-time (key 'time')"),
        ({"extra": ["array=0-3"]}, "'array' is set by the launcher"),
        ({"extra": ["constraint="]}, "'constraint=' is not KEY=VALUE"),
        ({"name": "local"}, "key 'name': 'local' is invalid; this launcher is 'slurm'"),
    ],
)
def test_bad_settings_name_the_key_and_flag(data: dict, message: str) -> None:
    with pytest.raises(UserError) as e:
        SlurmSettings.from_mapping(data, "cluster.json: ")
    assert str(e.value).startswith("cluster.json: ")
    assert message in str(e.value)
    if "partiton" in data:
        assert "(did you mean 'partition'?)" in str(e.value)


def test_only_plain_arguments_and_importable_functions(tmp_path: Path) -> None:
    lau = SlurmLauncher(SlurmSettings(), tmp_path)
    with pytest.raises(TypeError, match="never models or tensors"):
        lau.submit(square, {"a": (str(tmp_path), object(), "")})
    with pytest.raises(TypeError, match="module-level functions"):
        lau.submit(lambda x: x, {"a": (1,)})
    assert not (tmp_path / "slurm" / "jobs.json").exists()


# ---- a real cluster ----


def test_array_of_four_writes_every_result(slurm_cluster: str, tmp_path: Path) -> None:
    lau = launcher(tmp_path / "run", slurm_cluster)
    ids = lau.submit(square, {f"t{i}": (tmp_path, i, "") for i in range(4)}, phase="squares")
    array = ids["t0"].split("_")[0]
    assert ids == {f"t{i}": f"{array}_{i}" for i in range(4)}  # one job array
    st = lau.wait(poll_s=0.5, timeout_s=60)
    assert {k: s.state for k, s in st.items()} == {f"t{i}": "COMPLETED" for i in range(4)}
    assert [(tmp_path / f"{i}.txt").read_text() for i in range(4)] == ["0\n", "1\n", "4\n", "9\n"]
    # a later process finds everything from the run folder alone
    later = launcher(tmp_path / "run", slurm_cluster)
    assert {k: later.result(k) for k in ids} == {"t0": 0, "t1": 1, "t2": 4, "t3": 9}
    record = json.loads((tmp_path / "run" / "slurm" / "jobs.json").read_text())
    [sub] = record["submissions"]
    assert (sub["phase"], sub["function"]) == ("squares", "test_slurm:square")
    assert sub["tasks"]["t3"] == {"job_id": f"{array}_3", "args": [str(tmp_path), 3, ""]}
    assert (tmp_path / "run" / "slurm" / f"{array}_3_0_log.out").exists()


def test_cancelled_task_is_detected_and_only_it_is_redone(
    slurm_cluster: str, tmp_path: Path
) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    lau = launcher(tmp_path / "run", slurm_cluster)
    tasks = {f"t{i}": (tmp_path, i, str(hold) if i == 2 else "") for i in range(4)}
    ids = lau.submit(square, tasks, phase="squares")
    wait_until(lambda: lau.statuses(["t2"])["t2"].state == "RUNNING")
    subprocess.run(["scancel", ids["t2"]], check=True)
    st = lau.wait(poll_s=0.5, timeout_s=60)
    assert {k: s.state for k, s in st.items()} == {
        "t0": "COMPLETED",
        "t1": "COMPLETED",
        "t2": "CANCELLED",
        "t3": "COMPLETED",
    }
    assert [k for k, s in st.items() if s.needs_redo] == ["t2"]
    assert not (tmp_path / "2.txt").exists()
    with pytest.raises(UserError, match=f"task 't2' \\(SLURM job {ids['t2']}\\) is CANCELLED"):
        lau.result("t2")

    hold.unlink()
    later = launcher(tmp_path / "run", slurm_cluster)  # a new process resumes from jobs.json
    new = later.redo()
    assert list(new) == ["t2"] and new["t2"] != ids["t2"]
    st = later.wait(poll_s=0.5, timeout_s=60)
    assert all(s.done for s in st.values()), st
    assert st["t2"].job_id == new["t2"] and st["t0"].job_id == ids["t0"]
    assert [(tmp_path / f"{i}.txt").read_text() for i in range(4)] == ["0\n", "1\n", "4\n", "9\n"]
    assert {k: later.result(k) for k in tasks} == {"t0": 0, "t1": 1, "t2": 4, "t3": 9}
    assert later.redo() == {}  # nothing left to redo


def test_failed_task_carries_its_traceback(slurm_cluster: str, tmp_path: Path) -> None:
    lau = launcher(tmp_path / "run", slurm_cluster)
    lau.submit(fail_if_odd, {"even": (0,), "odd": (1,)}, phase="fail")
    st = lau.wait(poll_s=0.5, timeout_s=60)
    assert (st["even"].state, st["odd"].state) == ("COMPLETED", "FAILED")
    assert st["odd"].needs_redo and not st["even"].needs_redo
    assert "ValueError: odd task 1" in (st["odd"].error or "")


def test_sbatch_refusal_is_one_user_error(slurm_cluster: str, tmp_path: Path) -> None:
    lau = launcher(tmp_path / "run", "no-such-partition")
    with pytest.raises(
        UserError, match="sbatch refused the 'squares' array of 2 tasks: .*partition"
    ):
        lau.submit(square, {f"t{i}": (tmp_path, i, "") for i in range(2)}, phase="squares")
    assert not (tmp_path / "run" / "slurm" / "jobs.json").exists()
