"""Preemption and time limits: SIGUSR2 (SLURM `--signal`) or SIGTERM (preemption, pod eviction)
asks training to stop, and so does a stop file in the run directory (written by a node-level parent
that got the signal while torchrun runs the ranks). At the next step boundary all ranks agree
through one all-reduce, save a complete checkpoint together, and the stage exits with PREEMPTED_EXIT
so its job can requeue."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

_requested: list[int] = []


def _on_signal(signum: int, _frame: Any) -> None:
    _requested.append(signum)


def install() -> None:
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def requested() -> bool:
    return bool(_requested)


def request() -> None:
    """Ask for a stop from code (tests, or a wrapper that caught the signal itself)."""
    _requested.append(0)


def any_rank_requested(stop_file: Path | None = None) -> bool:
    local = requested() or (stop_file is not None and stop_file.exists())
    flag = torch.tensor([1.0 if local else 0.0])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


class PreemptionCallback(TrainerCallback):
    """Turns a stop request into 'save a checkpoint now, then stop'."""

    def __init__(self, stop_file: Path) -> None:
        self.preempted = False
        self.stop_file = stop_file

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if any_rank_requested(self.stop_file):
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control
