"""`llava-cluster logs RUN STAGE`: print or follow a stage's log from the run directory.

Two logs per stage: `logs/<stage>.log` (what the stage entry writes on rank 0: progress, errors,
tracebacks; the same on every backend) and, with `--job`, the console output of the stage's latest
SLURM job task (`logs/slurm/<job>_<task>_log.out` from submitit, `logs/slurm/<job>.out` from
slurm/pipeline.sh). `--follow` keeps streaming until the stage has finished.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llava_cluster.errors import UserError
from llava_cluster.rundir import FINISHED, STAGES, RunDir

POLL_SECONDS = 1.0


def job_log(run: RunDir, stage: str, task: int = 0) -> Path:
    """Console output of the stage's latest SLURM job (submitit's name first, then pipeline.sh's)."""
    ids = run.read_state(stage).job_ids
    if not ids:
        raise UserError(f"{stage} of {run.root} has no SLURM job recorded in state/{stage}.json")
    folder = run.logs_dir / "slurm"
    submitit_name = folder / f"{ids[-1]}_{task}_log.out"
    plain_name = folder / f"{ids[-1]}.out"
    return plain_name if plain_name.exists() and not submitit_name.exists() else submitit_name


def tail_start(path: Path, lines: int | None) -> int:
    """Byte offset where the last `lines` lines of `path` begin (0 for the whole file)."""
    if lines is None:
        return 0
    data = path.read_bytes()
    cut = len(data)
    for _ in range(lines + (1 if data.endswith(b"\n") else 0)):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return 0
    return cut + 1


def stream(run: RunDir, stage: str, path: Path, follow: bool, lines: int | None) -> int:
    out = sys.stdout.buffer
    offset: int | None = None
    while True:
        finished = run.read_state(stage).status in FINISHED  # read before the file: no lost last lines
        if path.exists():
            if offset is None:
                offset = tail_start(path, lines)
            with path.open("rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
            offset += len(chunk)
            out.write(chunk)
            out.flush()
        if not follow or finished:
            break
        time.sleep(POLL_SECONDS)
    if offset is None:
        state = run.read_state(stage)
        jobs = f", job {state.job_ids[-1]}" if state.job_ids else ""
        raise UserError(f"no log yet for {stage}: {path} does not exist ({state.status}{jobs})", exit_code=1)
    return 0


def handle(args: argparse.Namespace) -> int:
    from llava_cluster.find_run import resolve_run_dir

    run = RunDir(resolve_run_dir(args.run, args.overrides, args.storage))
    if not run.root.is_dir():
        raise UserError(f"run directory not found: {run.root}")
    path = job_log(run, args.stage, args.task) if args.job else run.log_path(args.stage)
    try:
        return stream(run, args.stage, path, args.follow, args.tail)
    except BrokenPipeError:  # `| head` closed the pipe: not an error
        return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = "Print a stage's log from a run directory; --follow streams it until the stage ends."
    parser.epilog = (
        "examples:\n"
        "  llava-cluster logs /shared/runs/my-run train --follow          stream training as it runs\n"
        "  llava-cluster logs /shared/runs/my-run merge --tail 50         the last 50 lines\n"
        "  llava-cluster logs /shared/runs/my-run train --job --task 3    SLURM console output of rank 3\n"
        "  llava-cluster logs jobs/tiny-local.yaml train -n 20            the run of a spec (or give its name)\n"
    )
    from llava_cluster.status import add_run_arguments

    add_run_arguments(parser)
    parser.add_argument("stage", choices=STAGES, metavar="STAGE", help=" | ".join(STAGES))
    parser.add_argument("-f", "--follow", action="store_true", help="keep streaming until the stage has finished")
    parser.add_argument("-n", "--tail", type=int, default=None, metavar="N", help="start with the last N lines only")
    parser.add_argument("--job", action="store_true",
                        help="the console output of the stage's latest SLURM job instead of the stage log")
    parser.add_argument("--task", type=int, default=0, metavar="N", help="with --job: which task (rank) (default 0)")
    parser.set_defaults(func=handle)
