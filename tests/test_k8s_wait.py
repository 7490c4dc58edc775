"""The merge and validate Jobs' init container (launch/k8s_wait.py): it waits for the previous stage's
success, outlives a failure that a restart replaces, and gives up on one that stands."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from llava_cluster.launch.k8s_wait import WAIT_FAILED_EXIT, wait_for_stage, waiter_args
from llava_cluster.rundir import RunDir, StageState


def _write_state(run_dir: Path, stage: str, status: str, attempts: int, error: str | None = None) -> None:
    RunDir(run_dir).write_state(StageState(stage=stage, status=status, attempts=attempts, error=error))


def test_wait_returns_at_once_when_the_stage_succeeded(tmp_path):
    _write_state(tmp_path, "train", "succeeded", 1)
    assert wait_for_stage(tmp_path, "train", poll=0.01, grace=0) == 0


def test_wait_fails_when_a_failure_stands_for_the_grace_period(tmp_path, capsys):
    _write_state(tmp_path, "merge", "failed", 2, error="CUDA out of memory")
    assert wait_for_stage(tmp_path, "merge", poll=0.01, grace=0.05) == WAIT_FAILED_EXIT
    assert "CUDA out of memory" in capsys.readouterr().err


def test_wait_outlives_a_stale_failure_that_a_restart_replaces(tmp_path):
    """An earlier submission's failure, then the new train pod starts and succeeds: merge runs."""
    _write_state(tmp_path, "train", "failed", 1)

    def restart_then_succeed():
        time.sleep(0.2)
        _write_state(tmp_path, "train", "running", 2)
        time.sleep(0.2)
        _write_state(tmp_path, "train", "succeeded", 2)

    thread = threading.Thread(target=restart_then_succeed)
    thread.start()
    assert wait_for_stage(tmp_path, "train", poll=0.02, grace=5) == 0
    thread.join()


def test_wait_command_as_the_init_container_runs_it(tmp_path):
    """The init container's own arguments: no state file yet (train not started) keeps it waiting; then
    success ends it with 0."""
    python, *args = waiter_args("train", tmp_path)  # what the manifests give the init container
    assert python == "python"
    proc = subprocess.Popen([sys.executable, *args, "--poll", "0.1"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert proc.poll() is None
    _write_state(tmp_path, "train", "succeeded", 1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "train succeeded" in out
