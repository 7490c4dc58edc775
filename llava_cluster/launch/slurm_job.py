"""What a SLURM task runs: a small supervisor around `llava-cluster stage ...` (submitit pickles it).

Each srun task (one per GPU) starts the stage command as a child and turns its exit into the job's
fate. SLURM delivers `--signal` / preemption signals to every process of the step, so the child gets
them directly; the supervisor only remembers that one came. Then, on global rank 0:

  exit 0                      the job succeeds, the next stage's afterok dependency releases it
  exit 75, or killed by the   preempted: below slurm.max_requeues (SLURM_RESTART_COUNT) it asks the
  signal before it could      batch script to `scontrol requeue` the job (a marker file read by the
  save                        script's teardown, outside any container, where scontrol exists);
                              at the limit the stage fails with a message saying so
  bad exit, success recorded  the job succeeds: the recorded result decides, not a rank that crashed
                              while tearing down (other ranks wait up to a minute for rank 0's record)
  anything else               the stage fails; the job fails, SLURM cancels the dependent jobs and
                              their state files say why

This module is imported on compute nodes: keep it free of heavy imports.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from llava_cluster.launch.topology import global_rank
from llava_cluster.rundir import FINISHED, PREEMPTED_EXIT, RunDir
from llava_cluster.stage import stage_argv

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
RECORD_WAIT_SECONDS = 60.0  # how long a non-zero rank that exited badly waits for rank 0 to record a result


def requeue_marker(folder: str | Path, job_id: str) -> Path:
    """The file whose presence makes the batch script requeue job `job_id` after srun returns."""
    return Path(folder) / f"requeue-{job_id}"


class StageFailed(RuntimeError):
    """Raised so that submitit records a failure and the SLURM job ends FAILED (dependents cancelled)."""


@dataclass(frozen=True)
class StageJob:
    stage: str
    run_dir: str
    command: tuple[str, ...]
    max_requeues: int
    downstream: tuple[str, ...]
    marker_folder: str

    def __call__(self) -> int:
        signals: list[int] = []
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, _frame: signals.append(signum))
        proc = subprocess.Popen(self.command)
        code = proc.wait()  # PEP 475: a handled signal does not interrupt the wait
        return self.outcome(code, bool(signals))

    def outcome(self, code: int, signalled: bool) -> int:
        """Decide what the job does after the stage exited with `code` (negative: killed by signal)."""
        if code == 0:
            return 0
        run = RunDir(self.run_dir)
        job_id = os.environ.get("SLURM_JOB_ID", "?")
        killed_by_stop = code < 0 and -code in STOP_SIGNALS
        if code == PREEMPTED_EXIT or (signalled and killed_by_stop):
            restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
            if restarts < self.max_requeues:
                if global_rank() == 0:
                    run.update_state(self.stage, status="preempted",
                                     error=f"interrupted; job {job_id} requeued ({restarts + 1} of at most "
                                           f"{self.max_requeues}) to resume from the last complete checkpoint")
                    requeue_marker(self.marker_folder, job_id).touch()
                return PREEMPTED_EXIT
            self._fail(run, f"requeue limit reached: interrupted {restarts + 1} times and slurm.max_requeues is "
                            f"{self.max_requeues}; {_resume_hint(run)}")
        if self._recorded_success(run):
            return 0
        if global_rank() != 0:
            raise StageFailed(f"stage {self.stage} exited with {_describe(code)} on rank {global_rank()}")
        state = run.read_state(self.stage)
        if state.status not in FINISHED:
            self._fail(run, f"the stage process exited with {_describe(code)} before recording a result "
                            f"(job {job_id}; console output in {self.marker_folder})")
        self._cancel_downstream(run, job_id)
        raise StageFailed(f"stage {self.stage} failed: {state.error}")

    def _recorded_success(self, run: RunDir) -> bool:
        """The stage's recorded result decides: a rank that crashes while tearing down after training
        (rank 0 records success a moment later) does not fail the job, and with it merge and validate."""
        deadline = time.monotonic() + (RECORD_WAIT_SECONDS if global_rank() != 0 else 0)
        while True:
            status = run.read_state(self.stage).status
            if status != "running" or time.monotonic() >= deadline:
                return status == "succeeded"
            time.sleep(1)

    def _fail(self, run: RunDir, message: str) -> None:
        if global_rank() == 0:
            run.mark_done(self.stage, error=message)
            self._cancel_downstream(run, os.environ.get("SLURM_JOB_ID", "?"))
        raise StageFailed(message)

    def _cancel_downstream(self, run: RunDir, job_id: str) -> None:
        for later in self.downstream:
            if run.read_state(later).status == "pending":
                run.update_state(later, status="cancelled", finished_at=time.time(),
                                 error=f"not run: {self.stage} failed (job {job_id}), SLURM cancelled this job")


def _describe(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _resume_hint(run: RunDir) -> str:
    last = run.last_checkpoint()
    where = f"the last complete checkpoint is {last.name}" if last else "no complete checkpoint was saved"
    return f"{where}; submit the run again to resume (raise slurm.max_requeues or resources.time if it keeps happening)"


def stage_command(python: str, stage: str, run_dir: str | Path) -> tuple[str, ...]:
    """The stage entry as argv; `python` is the command line of llava-cluster (may hold several words)."""
    return (*shlex.split(python), *stage_argv(stage, run_dir))
