"""The init container of the merge and validate Jobs: Kubernetes orders no Jobs, so each waits here
until the previous stage's `state/<stage>.json` says succeeded (exit 0), or fails with
WAIT_FAILED_EXIT when that stage stays failed, which the Job's podFailurePolicy turns into a failed
Job instead of a retry. It runs in the pod, beside the run directory: it reads state files only.

    python -m llava_cluster.launch.k8s_wait train --run-dir /shared/runs/my-run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llava_cluster.rundir import STAGES, UNSUCCESSFUL, RunDir

WAIT_FAILED_EXIT = 3  # "the upstream stage failed": fail the Job, do not retry
MODULE = "llava_cluster.launch.k8s_wait"


def waiter_args(stage: str, run_dir: str | Path) -> list[str]:
    """The init container's argument list (what `main` below parses)."""
    return ["python", "-m", MODULE, stage, "--run-dir", str(run_dir)]


def wait_for_stage(run_dir: Path, stage: str, poll: float, grace: float) -> int:
    """Block until `stage` succeeded (0). A failure is final (WAIT_FAILED_EXIT) only once it has
    stood for `grace` seconds: a stale failure from an earlier submission, or a rank that its
    restart policy restarts, turns the state back to running within that time."""
    rd = RunDir(run_dir)
    failed_since: float | None = None
    seen: tuple[str, int] | None = None
    while True:
        try:
            state = rd.read_state(stage)
        except (OSError, ValueError):
            state = None  # unreadable for a moment (shared file systems): look again
        if state is not None:
            if state.status == "succeeded":
                print(f"{stage} succeeded", flush=True)
                return 0
            now = time.monotonic()
            current = (state.status, state.attempts)
            if state.status in UNSUCCESSFUL:
                if current != seen:
                    failed_since = now
                    print(f"{stage} {state.status} (attempt {state.attempts}): waiting {grace:.0f}s for a "
                          f"retry before giving up", flush=True)
                elif failed_since is not None and now - failed_since >= grace:
                    print(f"{stage} {state.status}: {state.error or 'no error recorded'}", file=sys.stderr)
                    return WAIT_FAILED_EXIT
            seen = current
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Init-container helper of the merge and validate Jobs: wait until a stage of the "
                    f"run succeeded (exit 0), or fail (exit {WAIT_FAILED_EXIT}) when it stays failed.",
        epilog=f"example:\n  {' '.join(waiter_args('train', '/shared/runs/my-run'))}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("stage", choices=STAGES, help="the stage to wait for")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between reads (default 30)")
    parser.add_argument("--grace", type=float, default=1800.0,
                        help="seconds a failure must stand before it is final (default 1800)")
    args = parser.parse_args(argv)
    return wait_for_stage(args.run_dir, args.stage, args.poll, args.grace)


if __name__ == "__main__":
    sys.exit(main())
