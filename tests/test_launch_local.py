"""Local backend: one live submit per run (the second is refused naming the holder), a dead holder blocks
nothing, and a stage's recorded success stands over its exit code."""

from __future__ import annotations

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
        monkeypatch.setattr(subprocess, "call", lambda *a, **k: started.append(a) or 0)
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
