"""Issue 11, fault 3: killed runs no longer stay RUNNING in MLflow forever.

Ctrl-C ends the run KILLED at once; a process killed outright (SIGKILL, an OOM kill) cannot end its run, so the
next run on the same machine ends it KILLED, found by the process id and host every run records.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from sftcurate.infra import tracking

pytestmark = pytest.mark.faults

# Starts a run, says its id, then waits to be killed. Python ignores SIGINT for good when it starts with SIGINT
# ignored, as every process a non-interactive shell puts in the background does (`make test &`, nohup, some CI
# runners): the child puts back the handler an interactive terminal gives, so SIGINT means Ctrl-C here.
HOLD_RUN = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from sftcurate.infra import tracking
with tracking.start_run("victim", experiment=sys.argv[1]) as run_id:
    print(run_id, flush=True)
    time.sleep(600)
"""


@pytest.fixture
def experiment() -> str:
    return f"faults-{uuid.uuid4().hex[:8]}"


def status(run_id: str) -> str:
    return tracking.client().get_run(run_id).info.status


def start_holding(experiment: str, signum: int) -> tuple[str, int]:
    """A separate process holding a RUNNING run; killed with `signum` once the run exists. (run id, pid)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_RUN, experiment], stdout=subprocess.PIPE, text=True)
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id and status(run_id) == "RUNNING"
        assert tracking.client().get_run(run_id).data.tags[tracking.PID_TAG] == str(proc.pid)
    finally:
        proc.send_signal(signum)
        proc.wait(timeout=60)
    return run_id, proc.pid


def test_ctrl_c_marks_the_run_killed_at_once(experiment):
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run("interrupted", experiment=experiment) as run_id:
            raise KeyboardInterrupt
    assert status(run_id) == "KILLED"
    with pytest.raises(ValueError):
        with tracking.start_run("broken", experiment=experiment) as failed_id:
            raise ValueError("a bug")
    assert status(failed_id) == "FAILED"
    with tracking.start_run("fine", experiment=experiment) as finished_id:
        pass
    assert status(finished_id) == "FINISHED"
    tags = tracking.client().get_run(finished_id).data.tags
    assert tags[tracking.PID_TAG] == str(os.getpid()) and tags[tracking.HOST_TAG] == socket.gethostname()


def test_sigint_to_a_real_process_marks_its_run_killed(experiment):
    run_id, _ = start_holding(experiment, signal.SIGINT)
    assert status(run_id) == "KILLED"


def test_the_next_run_ends_runs_of_dead_processes_killed(experiment):
    c = tracking.client()
    orphan, dead_pid = start_holding(experiment, signal.SIGKILL)  # the run could not end itself
    assert status(orphan) == "RUNNING"
    exp_id = tracking.experiment_id(experiment)
    mine = tracking.process_tags()
    alive = c.create_run(exp_id, tags={**mine}).info.run_id  # this process: alive
    elsewhere = c.create_run(exp_id, tags={**mine, tracking.HOST_TAG: "another-machine",
                                           tracking.PID_TAG: str(dead_pid)}).info.run_id
    try:
        with tracking.start_run("next", experiment=experiment) as run_id:
            assert status(orphan) == "KILLED"
            assert status(alive) == "RUNNING"        # its process lives
            assert status(elsewhere) == "RUNNING"    # its process cannot be checked from here
            assert status(run_id) == "RUNNING"
    finally:
        for rid in (alive, elsewhere):
            c.set_terminated(rid, status="FINISHED")
