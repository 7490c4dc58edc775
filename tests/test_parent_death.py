"""Ranks and stage processes end with their parent: torchrun's ranks live in sessions of their own, so a
kill -9 of the submit's process group used to leave them training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RANK = """
import os, sys, time
from llava_cluster.launch.parent_death import end_with_torchrun
end_with_torchrun()
open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pid"), "w").write(str(os.getpid()))
time.sleep(300)
"""

PARENT = """
import subprocess, sys, time
from llava_cluster.launch.parent_death import child_dies_with_us
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                         **child_dies_with_us())
print(child.pid, flush=True)
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], seconds: float = 60) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_torchrun_ranks_die_when_torchrun_is_killed(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 str(script), str(tmp_path)], start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
        assert len(pids) == 2, "torchrun did not start its ranks"
        os.killpg(torchrun.pid, signal.SIGKILL)  # the whole group: the ranks are not in it
        torchrun.wait()
        assert wait_gone(pids) == [], "ranks outlived torchrun"
    finally:
        for p in tmp_path.glob("rank*.pid"):
            if alive(int(p.read_text())):
                os.kill(int(p.read_text()), signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_a_stage_child_in_its_own_session_dies_with_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait()
    assert wait_gone([child]) == [], "the child outlived its parent"
