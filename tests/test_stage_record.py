"""A stage's record (stage_record.py): its exit follows this attempt's recorded result, and rank 0 keeps a
heartbeat while it runs."""

from __future__ import annotations

import json
import time

from llava_cluster.rundir import RunDir
from llava_cluster.stage_record import Heartbeat, recorded_exit


def make_run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "runs" / "r")
    run.root.mkdir(parents=True)
    return run


def test_recorded_exit_follows_this_attempts_record(tmp_path):
    run = make_run(tmp_path)
    run.mark_running("train")
    run.update_state("train", status="preempted")
    assert recorded_exit(run, "train", 1, attempts_before=0) == 75
    assert recorded_exit(run, "train", 1, attempts_before=1) == 1
    assert recorded_exit(run, "train", 75, attempts_before=1) == 75  # another node counted the attempt first
    run.mark_done("train", error="boom")
    assert recorded_exit(run, "train", 2, attempts_before=0) == 2


def test_rank0_writes_a_heartbeat_while_the_stage_runs(tmp_path):
    import os
    import socket

    run = make_run(tmp_path)
    with Heartbeat(run, "train", every=0.01):
        deadline = time.monotonic() + 30
        beats = set()
        while len(beats) < 2 and time.monotonic() < deadline:
            beat = run.read_heartbeat("train")
            if beat:
                beats.add(beat["time"])
            time.sleep(0.01)
    assert len(beats) >= 2, "the heartbeat is not rewritten"
    beat = json.loads(run.heartbeat_path("train").read_text())
    assert beat["pid"] == os.getpid() and beat["host"] == socket.gethostname()
    assert not list(run.state_dir.glob(".*.tmp")), "heartbeat writes are not atomic"
