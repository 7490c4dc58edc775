"""`llava-cluster status RUN`: the stage table read from the run directory, whatever backend
ran it, with the tail of the log of a stage that failed."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from llava_cluster.console import console
from llava_cluster.errors import UserError
from llava_cluster.find_run import resolve_run_dir
from llava_cluster.rundir import AWAITING_JOB, STAGES, STALE_AFTER_SECONDS, RunDir, StageState

COLOURS = {"succeeded": "green", "running": "cyan", "pending": "white", "preempted": "yellow",
           "failed": "red", "cancelled": "magenta"}


def tail(path: Path, lines: int = 20) -> list[str]:
    if not path.is_file():
        return []
    with path.open(errors="replace") as fh:
        return [line.rstrip("\n") for line in deque(fh, maxlen=lines)]


def _elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def scheduler_notes(states: list) -> dict[str, str]:
    """For stages the run directory still calls pending/running: what SLURM says their last job did.
    A job killed at its time limit without the signal, or cancelled by hand, cannot update its state
    file itself; its end shows here."""
    from llava_cluster.launch.slurm import job_states

    open_jobs = {s.stage: s.job_ids[-1] for s in states if s.status in AWAITING_JOB and s.job_ids}
    if not open_jobs:
        return {}
    try:
        seen = job_states(list(open_jobs.values()))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {stage: f"SLURM job {job} {seen[job]}" for stage, job in open_jobs.items()
            if seen.get(job) not in (None, "", "PENDING", "RUNNING", "REQUEUED", "COMPLETING")}


def _process_gone(beat: dict) -> bool:
    """The heartbeat's process ran on this host and no longer exists."""
    if beat.get("host") != socket.gethostname() or not isinstance(beat.get("pid"), int):
        return False
    try:
        os.kill(beat["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def staleness(run: RunDir, state: StageState, now: float | None = None) -> str | None:
    """Why a stage recorded as running is probably dead, or None: its heartbeat (or, before the first one,
    its start) is older than STALE_AFTER_SECONDS, or its process on this host is gone."""
    if state.status != "running":
        return None
    beat = run.read_heartbeat(state.stage) or {}
    last = beat.get("time") or state.started_at
    if last is None:
        return None
    age = (time.time() if now is None else now) - last
    gone = _process_gone(beat)
    if not gone and age < STALE_AFTER_SECONDS:
        return None
    ckpt = run.last_checkpoint() if state.stage == "train" else None
    then = f"resubmit to resume from {ckpt.name}" if ckpt else "resubmit to run it again"
    if gone:
        return f"stale — its process (pid {beat['pid']} on {beat['host']}) is gone, the job died; {then}"
    return f"stale — no heartbeat for {int(age // 60)} min, the job probably died; {then}"


def show_status(run_dir: Path, as_json: bool = False, tail_lines: int = 20) -> int:
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not run.spec_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no spec.yaml)")
    states = [run.read_state(s) for s in STAGES]
    notes = scheduler_notes(states)
    stale = {s.stage: why for s in states if (why := staleness(run, s))}
    if as_json:
        console.print_json(json.dumps({"run": str(run.root), "checkpoints": [p.name for p in run.checkpoints()],
                                       "stages": [{**asdict(s), "elapsed": s.elapsed, "scheduler": notes.get(s.stage),
                                                   "stale": stale.get(s.stage),
                                                   "heartbeat": run.read_heartbeat(s.stage)} for s in states]}))
        return 0
    table = Table(title=f"run {run.root.name}  ({run.root})")
    for col in ("stage", "state", "job ids", "attempts", "elapsed", "note"):
        table.add_column(col)
    for s in states:
        colour = COLOURS.get(s.status, "white")
        shown = f"[{colour}]{s.status}[/]" + (" [red](stale)[/]" if s.stage in stale else "")
        table.add_row(s.stage, shown, ",".join(s.job_ids) or "-", str(s.attempts), _elapsed(s.elapsed),
                      "; ".join(x for x in (s.error, notes.get(s.stage), stale.get(s.stage)) if x))
    console.print(table)
    ckpts = run.checkpoints()
    if ckpts:
        console.print(f"checkpoints: {', '.join(p.name for p in ckpts)}")
    for s in states:
        if s.status == "failed":
            lines = tail(run.log_path(s.stage), tail_lines)
            if lines:
                console.rule(f"[red]last {len(lines)} lines of {run.log_path(s.stage)}")
                console.print("\n".join(lines), highlight=False, markup=False)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  llava-cluster status /shared/runs/my-run\n"
        "  llava-cluster status jobs/tiny-local.yaml              the run of a spec\n"
        "  llava-cluster status tiny-local --json                 the run named so in ./jobs/\n"
        "  llava-cluster status my-run --storage /shared\n"
    )
    add_run_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--lines", type=int, default=20, help="log lines to show for a failed stage")
    parser.set_defaults(func=lambda a: show_status(resolve_run_dir(a.run, a.overrides, a.storage), a.json, a.lines))


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN (a run directory, spec file or run name) and what resolves it (`status` and `logs`)."""
    parser.add_argument("run", metavar="RUN", help="a run directory (<storage>/runs/<name>), its spec file, "
                        "or its name")
    parser.add_argument("--storage", type=Path, default=None, help="with a run name: the storage root it is under")
    parser.set_defaults(overrides=[])  # a spec's KEY=VALUE overrides, given anywhere on the line
