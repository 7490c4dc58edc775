"""`stage`: under torchrun its exit is its ranks' recorded result (a rank's crash in teardown after success
does not fail it), a full disk is one message, the inputs are checked once per node, and Ctrl-C at the node
parent becomes the stop file."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from llava_cluster.launch import topology
from llava_cluster.rundir import RunDir
from llava_cluster.stage import _run_ranks_under_torchrun


def make_run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "runs" / "r")
    run.root.mkdir(parents=True)
    run.spec_path.write_text(yaml.safe_dump({"name": "r"}))
    return run


def ranks_that(monkeypatch, script: str) -> None:
    """torchrun replaced by one process running `script` with the run directory as argv[1]: what the
    ranks leave behind (state, exit code) is all the node parent sees of them."""
    monkeypatch.setattr(topology, "torchrun_argv",
                        lambda launch, argv: [sys.executable, "-c", script, argv[argv.index("--run-dir") + 1]])


SUCCEED_THEN_ABORT = """
import os, sys
from llava_cluster.rundir import RunDir
run = RunDir(sys.argv[1])
run.mark_running("train")
run.mark_done("train")
os._exit(134)  # rank 1 aborting in its teardown, after rank 0 recorded success
"""

DIE_BEFORE_RECORDING = """
import os
os._exit(1)
"""


def test_a_teardown_crash_after_recorded_success_is_a_success(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    ranks_that(monkeypatch, SUCCEED_THEN_ABORT)
    assert _run_ranks_under_torchrun(run, "train", topology.node_launch(2)) == 0
    assert run.read_state("train").status == "succeeded"


def test_ranks_dying_before_recording_fail_the_stage_even_after_an_earlier_success(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    run.mark_running("train")
    run.mark_done("train")  # an earlier attempt: not this one's result
    ranks_that(monkeypatch, DIE_BEFORE_RECORDING)
    assert _run_ranks_under_torchrun(run, "train", topology.node_launch(2)) == 1
    state = run.read_state("train")
    assert state.status == "failed" and "before recording a result" in state.error


@pytest.fixture(autouse=True)
def _one_rank(monkeypatch):
    """This process as the node parent; the stop-file handlers the node parent installs are undone after."""
    import signal

    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def small_disk(tmp_path):
    """A 320 KiB tmpfs: the spec, state and logs fit, the first checkpoint (~0.8 MiB) does not."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}); test_train's marker fault "
                    "covers ENOSPC from the real write path")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_message_a_recorded_failure_and_nothing_marked_complete(small_disk, tmp_path, tiny_dir):
    """Two ranks under torchrun: one message (rank 0's), torchrun's one line, no traceback from anyone; the
    inputs were checked once, by the node parent (its ranks skip the scan)."""
    from test_train import freeze, stage, write_spec

    spec = write_spec(tmp_path, tiny_dir, "full", storage=str(small_disk), resources__gpus_per_node=2,
                      optim__max_steps=2, training__save_steps=2, data__eval=None)
    run = RunDir(freeze(spec))
    proc = stage("train", run.root)
    assert proc.returncode == 1, proc.stderr[-4000:]
    err = " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and "iostream error" not in proc.stderr, proc.stderr[-4000:]
    assert "torchrun: 2 rank(s) failed" in proc.stderr or "torchrun: 1 rank(s) failed" in proc.stderr
    assert err.count("no space left on the storage of") == 1 and str(small_disk) in err
    state = run.read_state("train")
    assert state.status == "failed" and state.error.startswith("no space left on the storage of")
    assert not list(run.train_dir.glob("checkpoint-*")) and not run.final_dir.exists()
    assert run.log_path("train").read_text().count("preflight passed:") == 1


CTRL_C_AT_THE_NODE_PARENT = """
import os, signal, sys, time
from llava_cluster.rundir import RunDir
run = RunDir(sys.argv[1])
assert os.getpgid(0) != os.getpgid(os.getppid()), "the ranks share the node parent's process group"
stop = run.train_dir / "STOP"
assert not stop.exists(), "the last attempt's stop request was not cleared"
assert os.environ["LLAVA_CLUSTER_STOP_CLEARED"] == "1"  # so the ranks keep a request made while they start
run.mark_running("train")
os.kill(os.getppid(), signal.SIGINT)  # what the terminal sends the foreground group (the node parent)
for _ in range(600):
    if stop.exists():
        break
    time.sleep(0.1)
run.update_state("train", status="preempted")
sys.exit(75)
"""


def test_ctrl_c_at_the_node_parent_becomes_the_stop_file_and_the_ranks_carry_on(tmp_path, monkeypatch):
    from llava_cluster.launch.interrupt import interrupted

    run = make_run(tmp_path)
    run.train_dir.mkdir()
    (run.train_dir / "STOP").write_text("\n")  # the previous attempt's (a SLURM preemption)
    monkeypatch.delenv("LLAVA_CLUSTER_STOP_CLEARED", raising=False)
    ranks_that(monkeypatch, CTRL_C_AT_THE_NODE_PARENT)
    assert _run_ranks_under_torchrun(run, "train", topology.node_launch(2)) == 75
    assert interrupted(run.train_dir) and run.read_state("train").status == "preempted"


def test_stage_spec_freeze_non_rank0_waits_for_rank0(tmp_path, monkeypatch):
    """Pods of a PyTorchJob start together: a worker must wait for rank 0's spec.yaml, not fail."""
    import threading

    from test_spec_load import write

    from llava_cluster.errors import UserError
    from llava_cluster.spec import load_spec
    from llava_cluster.stage import freeze_spec

    spec_file = write(tmp_path)
    run = RunDir(tmp_path / "runs" / "r1")
    monkeypatch.setenv("RANK", "1")
    result: list[BaseException | None] = []

    def worker() -> None:
        try:
            freeze_spec(run, spec_file, wait_seconds=30)
            result.append(None)
        except BaseException as err:  # reported below
            result.append(err)

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(1.5)
    assert not result, "the worker gave up before rank 0 wrote the spec"
    run.spec_path.parent.mkdir(parents=True)
    run.spec_path.write_text(load_spec(spec_file).to_yaml())
    thread.join(timeout=10)
    assert result == [None]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="different spec"):
        freeze_spec(run, write(tmp_path, name="r1", method="qlora", training={"deepspeed": "zero2"}))
