"""Processes that must not outlive their parent. torchrun gives each rank a session of its own, so
killing a submit's process group (or SIGKILL to a node parent) used to leave the ranks training and
writing into the run directory beside the next attempt. Linux's parent-death signal ends them instead;
a kill at any moment is safe for the run, since only checkpoints marked COMPLETE are resumed from."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent exits, and send it now if `parent`
    (default: the parent at call time) is already gone. As a `preexec_fn`, pass parent=os.getpid() of
    the caller; it is safe there: the library was loaded before the fork and nothing is allocated."""
    if _libc is None:
        return
    parent = os.getppid() if parent is None else parent
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0 and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def child_dies_with_us() -> dict:
    """Popen keyword arguments for a child that must end when this process does."""
    return {"preexec_fn": functools.partial(die_with_parent, parent=os.getpid())}


def end_with_torchrun() -> None:
    """In a rank started by torchrun (a session of its own): die with torchrun's agent."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        die_with_parent()
