"""Ctrl-C as a graceful stop. The first SIGINT asks training to stop the way a preemption does (the
stop file: every rank saves a checkpoint at the next step and the stage records `preempted`); the
second aborts at once. The terminal's SIGINT reaches only the foreground process group: the local
submit and a node parent start their children in groups of their own and pass the request on, so
no rank is killed by the first Ctrl-C."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llava_cluster.rundir import STOP_FILE

INTERRUPT_REASON = "interrupt"  # the stop file's text when Ctrl-C asked for the stop
ABORTED_EXIT = 130  # what a shell reports for a command ended by SIGINT
# set by a node parent that cleared the last attempt's stop file before starting its ranks: they must
# not clear it again, or a Ctrl-C while they start up would be lost
STOP_CLEARED_ENV = "LLAVA_CLUSTER_STOP_CLEARED"


def clear_stale_stop(train_dir: Path) -> None:
    """Forget the previous attempt's stop request: once, before this attempt's ranks train."""
    (train_dir / STOP_FILE).unlink(missing_ok=True)


def request_stop(train_dir: Path, reason: str = "") -> None:
    """Ask every rank of this run to checkpoint and stop (the stop file, written once)."""
    train_dir.mkdir(parents=True, exist_ok=True)
    stop = train_dir / STOP_FILE
    if not stop.exists():
        stop.write_text(f"{reason}\n")


def interrupted(train_dir: Path) -> bool:
    """Whether the stop file says Ctrl-C asked for the stop (rather than a scheduler's signal)."""
    stop = train_dir / STOP_FILE
    return stop.is_file() and stop.read_text().strip() == INTERRUPT_REASON


def stopped_note(train_dir: Path, step: int) -> str:
    """What the user reads (console, stage log, state) when training stopped after a checkpoint."""
    if interrupted(train_dir):
        return f"interrupted at step {step} — run it again to resume"
    return f"preempted at step {step}: checkpoint saved — resubmit to resume"


@contextmanager
def on_ctrl_c(first: Callable[[], Any], second: Callable[[], Any]) -> Iterator[None]:
    """Within the block, the first SIGINT calls `first`, any later one `second`."""
    count = [0]

    def handle(_sig: int, _frame: Any) -> None:
        count[0] += 1
        (first if count[0] == 1 else second)()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
