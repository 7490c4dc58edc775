"""Local backend: run the stages one after another on this machine, each as `llava-cluster stage`
in a child process (so a multi-rank train starts its ranks with torchrun, exactly as on a node)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from llava_cluster.console import console
from llava_cluster.rundir import RunDir
from llava_cluster.spec import RunSpec


def stage_command(run: RunDir, stage: str) -> list[str]:
    return [sys.executable, "-m", "llava_cluster.cli", "stage", stage, "--run-dir", str(run.root)]


def submit(spec: RunSpec, stages: list[str], dry_run: bool) -> int:
    run = RunDir(spec.run_dir)
    env = {**os.environ, **spec.env}
    for i, stage in enumerate(stages):
        cmd = stage_command(run, stage)
        if dry_run:
            console.print(f"[bold]{stage}[/]: {shlex.join(cmd)}", highlight=False, soft_wrap=True)
            continue
        console.rule(f"[bold]{stage}")
        code = subprocess.call(cmd, env=env)
        if code != 0:
            why = "was preempted (re-submit to resume)" if code == 75 else f"failed (exit {code})"
            for later in stages[i + 1:]:
                run.update_state(later, status="cancelled", error=f"{stage} {why}")
            return code
    return 0
