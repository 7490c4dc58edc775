"""`llava-cluster stage train|merge|validate --run-dir DIR`: the one entry every job runs, on every
backend. It reads the frozen spec from the run directory, records the stage's state there, and
writes the stage's log to `logs/<stage>.log` (tracebacks of unexpected errors go there too)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from llava_cluster.errors import UserError
from llava_cluster.launch.interrupt import (
    INTERRUPT_REASON,
    STOP_CLEARED_ENV,
    clear_stale_stop,
    on_ctrl_c,
    request_stop,
    stopped_note,
)
from llava_cluster.launch.parent_death import child_dies_with_us, end_with_torchrun
from llava_cluster.rundir import PREEMPTED_EXIT, STAGES, RunDir, is_rank0
from llava_cluster.stage_record import (
    FAILED_EXIT,
    RECORDED_EXITS,
    Heartbeat,
    aborted_note,
    record,
    recorded_exit,
    say_disk_full,
)

if TYPE_CHECKING:
    from llava_cluster.spec import RunSpec

# set for a train stage whose inputs were checked on this node already (by its node parent, or by the local
# submit that started it): it need not scan them again
INPUTS_CHECKED_ENV = "LLAVA_CLUSTER_INPUTS_CHECKED"
INPUTS_CHECKED = "preflight passed: model, tokenizer and data checked before the ranks start"


def stage_argv(stage: str, run_dir: str | Path, spec_file: str | Path | None = None) -> list[str]:
    """`stage <stage> --run-dir DIR [--spec FILE]`, what every launcher runs after its own llava-cluster
    command (local, torchrun's ranks, SLURM tasks, the pods' entrypoint); `register` below reads it."""
    argv = ["stage", stage, "--run-dir", str(run_dir)]
    return argv + ["--spec", str(spec_file)] if spec_file is not None else argv


class _StageLog(logging.FileHandler):
    """The stage log; a record it cannot write (full disk) is dropped instead of printing a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def freeze_spec(run: RunDir, spec_file: Path, wait_seconds: float = 600) -> None:
    """Put a spec into the run directory, refusing to silently replace a different one.

    Rank 0 writes it (as `submit` does); the other ranks (other pods of a PyTorchJob start at the
    same moment) wait for it to appear, then check it is the same spec.
    """
    from llava_cluster.spec import load_spec
    from llava_cluster.spec.frozen import freeze

    spec = load_spec(spec_file)
    deadline = time.monotonic() + wait_seconds
    while not is_rank0() and not run.spec_path.exists():
        if time.monotonic() > deadline:
            raise UserError(f"waited {wait_seconds:.0f} s for rank 0 to write {run.spec_path}; is rank 0 running?")
        time.sleep(1)
    freeze(spec, run)


def _attach_log(run: RunDir, stage: str) -> logging.Handler | None:
    if not is_rank0():
        return None
    run.logs_dir.mkdir(parents=True, exist_ok=True)
    handler = _StageLog(run.log_path(stage))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    return handler


def _run_ranks_under_torchrun(run: RunDir, stage: str, launch: object) -> int:
    """Node shape: start this node's ranks with torchrun; a signal to us becomes the stop file."""
    from llava_cluster.launch.topology import torchrun_argv

    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, lambda _sig, _frame: request_stop(run.train_dir))
    before = run.read_state(stage).attempts
    if getattr(launch, "node_rank", 0) == 0:
        clear_stale_stop(run.train_dir)
    # a group of its own: a terminal's Ctrl-C reaches us, not torchrun (whose agent would kill the ranks)
    proc = subprocess.Popen(torchrun_argv(launch, stage_argv(stage, run.root)),
                            env={**os.environ, STOP_CLEARED_ENV: "1", INPUTS_CHECKED_ENV: "1"}, process_group=0,
                            **child_dies_with_us())
    try:
        with on_ctrl_c(first=lambda: request_stop(run.train_dir, INTERRUPT_REASON), second=proc.kill):
            code = proc.wait()  # PEP 475: a handled signal does not interrupt the wait
    finally:
        if proc.poll() is None:  # we are being torn down: torchrun and its ranks go with us
            proc.kill()
    result = recorded_exit(run, stage, code, before)
    state = run.read_state(stage)
    if result not in RECORDED_EXITS.values() and is_rank0() and getattr(launch, "node_rank", 0) == 0 \
            and (state.status == "running" or state.attempts == before):
        from llava_cluster.diskfull import is_nearly_full

        if is_nearly_full(run.root):  # another rank hit it and stays quiet: rank 0 was killed before saying it
            say_disk_full(run, stage)
        else:
            record(run.mark_done, stage, error=f"ranks exited with code {code} before recording a result")
    return result


def _check_inputs(run: RunDir, spec: RunSpec) -> None:
    """The train stage's preflight, once per node: by the node parent before torchrun starts its ranks
    (they skip it: a full data scan each would say nothing new), or by a process that is its node's
    only one or an srun task; a local submit has made it already. A problem is the stage's recorded
    failure, said once, no traceback."""
    from llava_cluster.preflight import preflight

    try:
        preflight(spec, run_name=False, what="starting the ranks")
    except UserError as err:
        record(run.mark_done, "train", error=err.message)
        raise
    with contextlib.suppress(OSError):  # the line is a courtesy; a full disk is the training's to report
        handler = _attach_log(run, "train")
        if handler is not None:
            logging.getLogger("llava_cluster").info(INPUTS_CHECKED)
            logging.getLogger().removeHandler(handler)
            handler.close()


def _execute(stage: str, run: RunDir) -> int:
    from llava_cluster.spec import load_spec

    spec = load_spec(run.spec_path)
    if stage == "train":
        from llava_cluster.train.run import train

        return train(spec, run)
    if stage == "merge":
        from llava_cluster.merge.run import merge_stage

        return merge_stage(spec, run)
    from llava_cluster.validate.run import validate_stage

    return validate_stage(spec, run)


def run_stage(stage: str, run_dir: Path, spec_file: Path | None = None) -> int:
    """Run one stage as this process (one rank, or the node parent). Returns the exit code."""
    from llava_cluster.launch.topology import node_launch, rank_env

    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    run = RunDir(run_dir)
    if spec_file is not None:
        freeze_spec(run, spec_file)
    if not run.spec_path.is_file():
        raise UserError(f"{run.root} has no spec.yaml: submit the run first (llava-cluster submit SPEC)")
    if stage == "train":
        from llava_cluster.noise import quiet
        from llava_cluster.spec import load_spec

        spec = load_spec(run.spec_path)
        quiet(qlora=spec.method == "qlora")  # before bitsandbytes can be imported
        if not os.environ.get(INPUTS_CHECKED_ENV):
            _check_inputs(run, spec)
        ranks = rank_env()
        if ranks is None:
            launch = node_launch(spec.resources.gpus_per_node)
            if launch.world_size > 1:
                return _run_ranks_under_torchrun(run, stage, launch)
        else:
            os.environ.update(ranks)
            end_with_torchrun()
    elif not is_rank0():
        return 0  # merge and validate are one process; extra ranks have nothing to do

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rich progress and the stage log say it once, cleanly
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not the user's concern
    handler = None
    try:
        handler = _attach_log(run, stage)
        run.mark_running(stage)
        with Heartbeat(run, stage):
            code = _execute(stage, run)
    except UserError as err:
        logging.getLogger("llava_cluster").error("%s failed: %s", stage, err.message)
        record(run.mark_done, stage, error=err.message)
        raise
    except KeyboardInterrupt:  # Ctrl-C before training could checkpoint, or a second one
        why = aborted_note(run, stage)
        logging.getLogger("llava_cluster").error(why)
        record(run.update_state, stage, status="cancelled", error=why)
        raise
    except Exception as err:  # a bug or an environment failure: keep the traceback, say where it is
        from llava_cluster.diskfull import is_disk_full

        if is_disk_full(err, run.root):
            return _disk_full(run, stage, handler)
        logging.getLogger("llava_cluster").error("stage %s failed:\n%s", stage, traceback.format_exc())
        record(run.mark_done, stage, error=f"{type(err).__name__}: {err} (traceback in {run.log_path(stage)})")
        traceback.print_exc()
        return FAILED_EXIT
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    if code == PREEMPTED_EXIT:
        last = run.last_checkpoint()
        note = stopped_note(run.train_dir, int(last.name.removeprefix("checkpoint-"))) if last else \
            "stopped on request; resubmit to resume"
        recorded = record(run.update_state, stage, status="preempted", error=note)
    elif code == 0:
        recorded = record(run.mark_done, stage)
    else:
        recorded = record(run.mark_done, stage, error=f"exited with code {code}")
    return code if recorded else FAILED_EXIT


def _disk_full(run: RunDir, stage: str, handler: logging.Handler | None) -> int:
    """One message, from rank 0 (or the node parent, when rank 0 was killed first), no traceback."""
    if handler is not None:
        logging.getLogger().removeHandler(handler)
    if is_rank0():
        say_disk_full(run, stage)
    return FAILED_EXIT


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run one stage of a run directory in this process. Every job on every backend runs this; "
        "you rarely call it by hand."
    )
    parser.epilog = (
        "examples:\n"
        "  llava-cluster stage train --run-dir /shared/runs/my-run\n"
        "  llava-cluster stage merge --run-dir /shared/runs/my-run\n\n"
        "exit codes: 0 succeeded, 1 failed (see state/<stage>.json and logs/<stage>.log),\n"
        "            2 bad input, 75 preempted (a checkpoint was saved: run it again to resume)\n"
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--run-dir", required=True, type=Path, help="the run directory on shared storage")
    parser.add_argument("--spec", type=Path, default=None,
                        help="freeze this spec into the run directory first (when it has none yet)")
    parser.set_defaults(func=lambda args: run_stage(args.stage, args.run_dir, args.spec))

