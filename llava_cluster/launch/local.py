"""Local backend: run the stages one after another on this machine, each as `llava-cluster stage`
in a child process (so a multi-rank train starts its ranks with torchrun, exactly as on a node).
The submit holds the run's lock while it runs (a second submit of a live run is refused), and its
children end with it, however it ends. Each stage runs in a process group of its own, so a Ctrl-C
reaches only this process: the first is passed on as a graceful stop (every rank checkpoints), the
second kills the stage."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

from llava_cluster.console import console, print_message
from llava_cluster.launch.interrupt import ABORTED_EXIT, on_ctrl_c
from llava_cluster.launch.parent_death import child_dies_with_us
from llava_cluster.rundir import PREEMPTED_EXIT, RunDir
from llava_cluster.spec import RunSpec
from llava_cluster.stage import INPUTS_CHECKED_ENV, stage_argv
from llava_cluster.stage_record import record, recorded_exit


def stage_command(run: RunDir, stage: str) -> list[str]:
    return [sys.executable, "-m", "llava_cluster.cli", *stage_argv(stage, run.root)]


def submit(spec: RunSpec, stages: list[str], dry_run: bool) -> int:
    run = RunDir(spec.run_dir)
    if dry_run:
        for stage in stages:
            console.print(f"[bold]{stage}[/]: {shlex.join(stage_command(run, stage))}", highlight=False,
                          soft_wrap=True)
        return 0
    with run.lock():
        # submit has just checked the inputs on this machine: the train stage and its ranks need not again
        return _run_stages(run, stages, {**os.environ, **spec.env, INPUTS_CHECKED_ENV: "1"})


def _run_stages(run: RunDir, stages: list[str], env: dict[str, str]) -> int:
    for i, stage in enumerate(stages):
        console.rule(f"[bold]{stage}")
        before = run.read_state(stage).attempts
        code = recorded_exit(run, stage, _run_child(run, stage, env), before)
        if code != 0:
            why = {PREEMPTED_EXIT: "was stopped after a checkpoint (re-submit to resume)",
                   ABORTED_EXIT: "was aborted (Ctrl-C)"}.get(code, f"failed (exit {code})")
            for later in stages[i + 1:]:
                if not record(run.update_state, later, status="cancelled", error=f"{stage} {why}"):
                    break
            return code
    return 0


def _run_child(run: RunDir, stage: str, env: dict[str, str]) -> int:
    """One stage as a child; Ctrl-C: first a graceful stop, then an abort."""
    proc = subprocess.Popen(stage_command(run, stage), env=env, process_group=0, **child_dies_with_us())
    aborted: list[bool] = []

    def stop() -> None:
        print_message("stopping", "bold yellow", f"{stage} saves a checkpoint at the end of this step, then stops "
                      "(Ctrl-C again to abort without it)")
        proc.send_signal(signal.SIGINT)

    def abort() -> None:
        print_message("aborting", "bold red", f"{stage} is killed; its last complete checkpoint stays resumable")
        aborted.append(True)
        os.killpg(proc.pid, signal.SIGKILL)

    try:
        with on_ctrl_c(first=stop, second=abort):
            code = proc.wait()  # PEP 475: a handled signal does not interrupt the wait
    finally:
        if proc.poll() is None:
            proc.kill()
    if aborted:
        if run.read_state(stage).status == "running":
            record(run.update_state, stage, status="cancelled", error=f"{stage} aborted (Ctrl-C); run it again")
        return ABORTED_EXIT
    return code
