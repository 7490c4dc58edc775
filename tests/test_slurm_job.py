"""What every SLURM task runs (launch/slurm_job.py): StageJob supervises the stage and turns its exit into
the job's fate — success, a requeue below slurm.max_requeues, a failure that cancels the later stages —
with only global rank 0 writing the run directory, and the recorded result deciding over a teardown crash."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from llava_cluster.launch.slurm_job import PREEMPTED_EXIT, StageFailed, StageJob, requeue_marker
from llava_cluster.rundir import RunDir


@pytest.fixture
def job(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    run = RunDir(tmp_path / "run")
    for stage in ("train", "merge", "validate"):
        run.update_state(stage, status="pending", job_ids=["77"])
    folder = tmp_path / "run/logs/slurm"
    folder.mkdir(parents=True)
    return StageJob("train", str(run.root), ("true",), max_requeues=2, downstream=("merge", "validate"),
                    marker_folder=str(folder))


def test_success_needs_nothing(job):
    assert job.outcome(0, signalled=False) == 0
    assert not requeue_marker(job.marker_folder, "77").exists()


def test_preempted_below_the_limit_asks_for_a_requeue(job, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert job.outcome(PREEMPTED_EXIT, signalled=True) == PREEMPTED_EXIT
    assert requeue_marker(job.marker_folder, "77").exists()
    state = RunDir(job.run_dir).read_state("train")
    assert state.status == "preempted" and "requeued (2 of at most 2)" in state.error


def test_killed_by_the_stop_signal_before_saving_also_requeues(job):
    assert job.outcome(-signal.SIGTERM, signalled=True) == PREEMPTED_EXIT
    assert requeue_marker(job.marker_folder, "77").exists()


def test_requeue_limit_fails_the_stage_and_cancels_the_rest(job, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    ckpt = Path(job.run_dir) / "train/checkpoint-40"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").touch()
    with pytest.raises(StageFailed, match="requeue limit reached"):
        job.outcome(PREEMPTED_EXIT, signalled=True)
    run = RunDir(job.run_dir)
    train = run.read_state("train")
    assert train.status == "failed"
    assert "interrupted 3 times and slurm.max_requeues is 2" in train.error and "checkpoint-40" in train.error
    assert not requeue_marker(job.marker_folder, "77").exists()
    for later in ("merge", "validate"):
        state = run.read_state(later)
        assert state.status == "cancelled" and "train failed (job 77)" in state.error


def test_a_crash_without_a_recorded_result_is_recorded(job):
    RunDir(job.run_dir).update_state("train", status="running")
    with pytest.raises(StageFailed):
        job.outcome(-signal.SIGKILL, signalled=False)
    state = RunDir(job.run_dir).read_state("train")
    assert state.status == "failed" and "signal SIGKILL before recording a result" in state.error


def test_a_recorded_failure_is_kept(job):
    RunDir(job.run_dir).update_state("train", status="failed", error="data.train: bad JSON at line 3")
    with pytest.raises(StageFailed, match="bad JSON"):
        job.outcome(1, signalled=False)
    assert RunDir(job.run_dir).read_state("train").error == "data.train: bad JSON at line 3"
    assert RunDir(job.run_dir).read_state("merge").status == "cancelled"


def test_other_ranks_fail_the_job_but_write_no_state(job, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(StageFailed, match="exit code 1 on rank 1"):
        job.outcome(1, signalled=False)
    assert job.outcome(PREEMPTED_EXIT, signalled=True) == PREEMPTED_EXIT
    run = RunDir(job.run_dir)
    assert [run.read_state(s).status for s in ("train", "merge", "validate")] == ["pending"] * 3
    assert not requeue_marker(job.marker_folder, "77").exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_teardown_crash_after_recorded_success_does_not_fail_the_job(job, monkeypatch, rank):
    run = RunDir(job.run_dir)
    run.update_state("train", status="succeeded")  # by rank 0
    monkeypatch.setenv("SLURM_PROCID", rank)
    assert job.outcome(-signal.SIGABRT, signalled=False) == 0
    assert run.read_state("merge").status == "pending", "merge was cancelled after train succeeded"


@pytest.fixture
def keep_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_supervisor_survives_the_signal_and_reads_the_child_exit(job, keep_signal_handlers):
    """The child signals the supervisor (as SLURM would), then dies of SIGUSR2 before saving."""
    child = ("import os, signal; os.kill(os.getppid(), signal.SIGUSR2); "
             "os.kill(os.getpid(), signal.SIGUSR2)")
    supervised = StageJob(job.stage, job.run_dir, (sys.executable, "-c", child), job.max_requeues,
                          job.downstream, job.marker_folder)
    assert supervised() == PREEMPTED_EXIT
    assert requeue_marker(job.marker_folder, "77").exists()
