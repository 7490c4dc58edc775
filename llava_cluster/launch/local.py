"""Local backend: run the stages one after another on this machine, each as `llava-cluster stage`
in a child process (so a multi-rank train starts its ranks with torchrun, exactly as on a node).
The submit holds the run's lock while it runs (a second submit of a live run is refused), and its
children end with it, however it ends."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from llava_cluster.console import console
from llava_cluster.launch.parent_death import child_dies_with_us
from llava_cluster.rundir import PREEMPTED_EXIT, RunDir
from llava_cluster.spec import RunSpec


def stage_command(run: RunDir, stage: str) -> list[str]:
    return [sys.executable, "-m", "llava_cluster.cli", "stage", stage, "--run-dir", str(run.root)]


def submit(spec: RunSpec, stages: list[str], dry_run: bool) -> int:
    run = RunDir(spec.run_dir)
    if dry_run:
        for stage in stages:
            console.print(f"[bold]{stage}[/]: {shlex.join(stage_command(run, stage))}", highlight=False,
                          soft_wrap=True)
        return 0
    with run.lock():
        return _run_stages(run, stages, {**os.environ, **spec.env})


def _run_stages(run: RunDir, stages: list[str], env: dict[str, str]) -> int:
    from llava_cluster.stage import record, recorded_exit

    for i, stage in enumerate(stages):
        console.rule(f"[bold]{stage}")
        before = run.read_state(stage).attempts
        code = recorded_exit(run, stage, subprocess.call(stage_command(run, stage), env=env, **child_dies_with_us()),
                             before)
        if code != 0:
            why = "was preempted (re-submit to resume)" if code == PREEMPTED_EXIT else f"failed (exit {code})"
            for later in stages[i + 1:]:
                if not record(run.update_state, later, status="cancelled", error=f"{stage} {why}"):
                    break
            return code
    return 0
