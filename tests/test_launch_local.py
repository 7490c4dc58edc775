"""Local backend: one live submit per run (the second is refused naming the holder), a dead holder blocks
nothing, and a stage's recorded success stands over its exit code."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import yaml

from llava_cluster.errors import UserError
from llava_cluster.launch import local
from llava_cluster.rundir import RunDir
from llava_cluster.spec import load_spec

HOLD = """
import sys, time
from llava_cluster.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "live", "storage": str(tmp_path / "storage"),
                                    "model": {"base": str(tmp_path / "model")},
                                    "data": {"train": str(tmp_path / "t.json"), "image_folder": str(tmp_path)}}))
    return load_spec(path)


def test_a_second_submit_of_a_live_run_is_refused_and_a_killed_holder_blocks_nothing(spec, monkeypatch):
    run = RunDir(spec.run_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = []
        monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
        with pytest.raises(UserError) as err:
            local.submit(spec, ["train"], dry_run=False)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err.value.message
        assert started == [], "a stage started beside the live run"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run.lock():  # kill -9 released it
        pass


def test_storage_without_file_locks_runs_unguarded_with_a_warning(spec, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # an NFS mount without lockd answers this
    with RunDir(spec.run_dir).lock():
        pass
    assert "cannot lock" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_during_a_two_rank_local_run_checkpoints_records_and_resumes(tmp_path, tiny_dir):
    """Ctrl-C as a terminal sends it (SIGINT to the foreground process group) during step 2 of 8. Each
    attempt checks the inputs once, in `train` (the submit): neither the stage's node parent nor its two
    ranks scan them again (a stage that checks them says so in its log)."""
    from test_train import ENV, REPO, write_spec

    spec = write_spec(tmp_path, tiny_dir, "ctrl-c", optim__max_steps=8, training__save_steps=100)
    argv = [sys.executable, "-m", "llava_cluster.cli", "train", str(spec)]
    proc = subprocess.Popen(argv, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith("progress step=2/8"):
            os.killpg(proc.pid, signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 75, err
    run = RunDir(tmp_path / "storage" / "runs" / "ctrl-c")
    stopped = run.last_checkpoint()
    assert stopped is not None and stopped.name in ("checkpoint-2", "checkpoint-3"), err
    step = int(stopped.name.removeprefix("checkpoint-"))
    state = run.read_state("train")
    assert (state.status, state.error) == ("preempted", f"interrupted at step {step} — run it again to resume")
    assert f"interrupted at step {step} — run it again to resume" in err
    assert "Traceback" not in err and "failed" not in err, err
    assert "preflight passed:" not in (run.logs_dir / "train.log").read_text()

    again = subprocess.run(argv, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming from {stopped} (step {step})" in again.stderr
    assert run.read_state("train").status == "succeeded" and (run.final_dir / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (run.logs_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert "preflight passed:" not in (run.logs_dir / "train.log").read_text()
