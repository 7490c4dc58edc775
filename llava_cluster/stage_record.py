"""A stage's record in the run directory: the exit a stage ends with is the result it recorded, state
writes that fail (a full disk) are said in one line instead of a traceback, rank 0's heartbeat says the
stage is alive, and an abort or a full disk leaves a note that says what to do next."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from llava_cluster.rundir import HEARTBEAT_SECONDS, PREEMPTED_EXIT, RunDir, is_rank0

FAILED_EXIT = 1
RECORDED_EXITS = {"succeeded": 0, "preempted": PREEMPTED_EXIT}


def recorded_exit(run: RunDir, stage: str, code: int, attempts_before: int) -> int:
    """A stage's exit is its recorded result: once this attempt has recorded success (or a preemption
    with its checkpoint), a rank that crashes while tearing down does not turn it into a failure.
    An exit that agrees with the record needs no attempt count (another node's rank 0 may have
    counted this attempt before we read `attempts_before`)."""
    state = run.read_state(stage)
    expected = RECORDED_EXITS.get(state.status)
    if expected is not None and (state.attempts > attempts_before or code == expected):
        if code not in (0, expected):
            from llava_cluster.console import err_console

            err_console.print(f"[yellow]{stage}: a process exited with code {code} after the stage recorded "
                              f"'{state.status}'; keeping that result[/]")
        return expected
    return code or FAILED_EXIT


def record(write: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
    """Write stage state, or say plainly why it could not be written (a full disk): never a traceback."""
    try:
        write(*args, **kwargs)
        return True
    except OSError as err:
        from llava_cluster.console import print_message

        print_message("error", "bold red", f"could not record the stage state in the run directory: {err}")
        return False


class Heartbeat:
    """Rank 0 of a running stage rewrites state/<stage>.heartbeat.json every HEARTBEAT_SECONDS from a
    daemon thread, so `status` can tell a live stage from one whose process died without a word."""

    def __init__(self, run: RunDir, stage: str, every: float = HEARTBEAT_SECONDS) -> None:
        self.run, self.stage, self.every = run, stage, every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"heartbeat-{stage}", daemon=True)

    def _loop(self) -> None:
        while True:
            try:
                self.run.beat(self.stage)
            except OSError:  # a full or unreachable disk: the stage itself will say so
                pass
            if self.stopped.wait(self.every):
                return

    def __enter__(self) -> Heartbeat:
        if is_rank0():
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()


def aborted_note(run: RunDir, stage: str) -> str:
    """What the state and the log say after a Ctrl-C aborted the stage: how to go on."""
    last = run.last_checkpoint() if stage == "train" else None
    then = f"run it again to resume from {last.name}" if last else "run it again to start it over"
    return f"{stage} aborted (Ctrl-C) — {then}"


def say_disk_full(run: RunDir, stage: str) -> None:
    """One message for a full disk, printed and recorded. The half-written checkpoint (never resumed
    from) goes first, so that the failure can be recorded."""
    from llava_cluster.console import print_message
    from llava_cluster.diskfull import disk_full_message

    if stage == "train":
        from llava_cluster.train.run import drop_incomplete_checkpoints

        drop_incomplete_checkpoints(run)
    message = disk_full_message(run.root, run.last_checkpoint() if stage == "train" else None)
    print_message("error", "bold red", message)
    record(run.mark_done, stage, error=message)
