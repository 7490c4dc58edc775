"""What a person watching training sees, and the metrics log behind the report's loss curve.

On rank 0: a rich bar when stdout is a terminal, otherwise one plain `key=value` progress line per
logging step on stdout (batch logs: SLURM task logs, pods, pipes); the same line always goes to the
stage log (logs/train.log), with the run's events (start, resume, checkpoints, stop, end)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from llava_cluster.console import err_console
from llava_cluster.rundir import atomic_write_text, is_rank0

log = logging.getLogger("llava_cluster.train")


def interactive() -> bool:
    """A person at a terminal: the rich bar instead of progress lines on stdout."""
    return sys.stdout.isatty() and err_console.is_terminal


def event(message: str) -> None:
    """A training event (rank 0 only): into the stage log and onto the console."""
    if is_rank0():
        log.info(message)
        err_console.print(escape(message), highlight=False)


def _clock(seconds: float) -> str:
    m, s = divmod(int(max(seconds, 0)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def group_lrs(optimizer: Any) -> dict[str, float]:
    """Learning rate per parameter family ('lora', 'projector'), from the groups' names (trainer.param_groups)."""
    lrs: dict[str, float] = {}
    for group in getattr(optimizer, "param_groups", None) or []:
        family = str(group.get("name", "lora")).split("_")[0]
        lrs.setdefault(family, float(group["lr"]))
    return lrs


class ProgressLine(TrainerCallback):
    """`progress step=12/136 epoch=0.35 loss=1.2345 lr_lora=2.00e-03 lr_projector=2.00e-03 grad_norm=0.812
    tokens/s=5321 samples/s=21.3 eta=0:03:10` per logging step; rates are over the last interval, the ETA
    over this session's steps. Also reports checkpoints saved (with their time) and a stop request."""

    def __init__(self, samples_per_step: int, to_stdout: bool) -> None:
        self.samples_per_step = samples_per_step
        self.to_stdout = to_stdout
        self.session_start = self.last_time = self.mark = 0.0
        self.session_step = self.last_step = self.last_tokens = 0
        self.stop_said = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session_start = self.last_time = self.mark = time.monotonic()
        self.session_step = self.last_step = state.global_step
        self.last_tokens = state.num_input_tokens_seen

    def line(self, state: Any, logs: dict[str, float], optimizer: Any) -> str:
        now = time.monotonic()
        steps, seconds = state.global_step - self.last_step, max(now - self.last_time, 1e-9)
        done = state.global_step - self.session_step
        eta = (state.max_steps - state.global_step) * (now - self.session_start) / done if done else 0.0
        fields = [f"step={state.global_step}/{state.max_steps}", f"epoch={state.epoch or 0:.2f}",
                  f"loss={logs['loss']:.4f}"]
        fields += [f"lr_{family}={lr:.2e}" for family, lr in group_lrs(optimizer).items()]
        if logs.get("grad_norm") is not None:
            fields.append(f"grad_norm={logs['grad_norm']:.4f}")
        fields += [f"tokens/s={(state.num_input_tokens_seen - self.last_tokens) / seconds:.0f}",
                   f"samples/s={steps * self.samples_per_step / seconds:.2f}", f"eta={_clock(eta)}"]
        self.last_time, self.last_step, self.last_tokens = now, state.global_step, state.num_input_tokens_seen
        return "progress " + " ".join(fields)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        self.mark = time.monotonic()
        if not is_rank0() or not logs or "loss" not in logs:
            return
        text = self.line(state, logs, kw.get("optimizer"))
        log.info(text)
        if self.to_stdout:
            print(text, flush=True)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.mark = time.monotonic()  # a checkpoint's seconds exclude the evaluation before it

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.mark = time.monotonic()
        if control.should_training_stop and state.global_step < state.max_steps and not self.stop_said:
            self.stop_said = True
            event(f"stop requested at step {state.global_step}: every rank saves a checkpoint, then stops")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        event(f"checkpoint saved: {path} ({time.monotonic() - self.mark:.1f} s)")


class RichProgress(TrainerCallback):
    """The bar for a terminal (rank 0)."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not is_rank0():
            return
        self.progress = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=err_console, transient=False,
        )
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")
        self.progress.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if self.progress is not None and logs and "loss" in logs:
            self.progress.update(self.task, info=f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class ResumingTensorBoard(TensorBoardCallback):
    """HF's TensorBoard logger, but a resumed session purges the steps after its checkpoint (those the
    stopped session logged and this one replays), so the run directory reads as one run."""

    purge_step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.purge_step = state.global_step + 1 if state.global_step else None
        super().on_train_begin(args, state, control, **kwargs)

    def _init_summary_writer(self, args: Any) -> None:
        self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=self.purge_step)


def row_kind(row: dict[str, Any]) -> str:
    """'train' (a logging step's loss), 'eval', or 'summary' (the end-of-training totals)."""
    return "eval" if "eval_loss" in row else "train" if "loss" in row else "summary"


class MetricsLog(TrainerCallback):
    """Appends every logged value with its step to a JSONL file (the loss curve's source). A resumed
    session first drops the rows past its checkpoint: it is about to log those steps again."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not is_rank0() or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= state.global_step]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if not is_rank0() or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Logged rows in step order, one per (step, kind): the last value wins for a step logged twice
    (files written before resumes dropped replayed rows), and a summary row never hides a loss."""
    if not path.is_file():
        return []
    by_step: dict[tuple[int, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[(row["step"], row_kind(row))] = row
    return [by_step[k] for k in sorted(by_step)]
