"""`llava-cluster status`: the stage table from the run directory, the failing log's tail, and
what SLURM says about a job that could not record its own end (cancelled, timed out)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from llava_cluster.cli import main
from llava_cluster.rundir import RunDir


def make_run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "runs" / "r1")
    run.root.mkdir(parents=True)
    run.spec_path.write_text(yaml.safe_dump({"name": "r1"}))
    return run


def test_every_status_has_its_colour():
    from llava_cluster.rundir import STATUSES
    from llava_cluster.status import COLOURS

    assert set(COLOURS) == set(STATUSES)


def test_failed_stage_shows_its_error_and_log_tail(tmp_path, capsys):
    run = make_run(tmp_path)
    run.mark_running("train")
    run.mark_done("train", error="ValueError: boom (traceback in logs/train.log)")
    run.update_state("merge", status="cancelled", error="train failed (exit 1)")
    run.logs_dir.mkdir()
    run.log_path("train").write_text("".join(f"line {i}\n" for i in range(50)) + "ValueError: boom\n")
    assert main(["status", str(run.root), "--lines", "5"]) == 0
    out = capsys.readouterr().out
    assert "failed" in out and "cancelled" in out and "ValueError: boom" in out
    assert "line 49" in out and "line 44" not in out
    assert main(["status", str(run.root), "--json"]) == 0
    stages = {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert stages["train"]["attempts"] == 1 and stages["merge"]["error"] == "train failed (exit 1)"
    assert stages["validate"]["status"] == "pending"


@pytest.mark.slurm
def test_a_cancelled_slurm_job_shows_up_although_its_state_file_says_running(tmp_path, capsys):
    from test_slurm_cluster import _slurm_reachable

    why = _slurm_reachable()
    if why:
        pytest.skip(f"no SLURM reachable ({why})")
    job = subprocess.run(["sbatch", "--parsable", "--wrap", "sleep 120"], capture_output=True, text=True,
                         check=True).stdout.strip().split(";")[0]
    subprocess.run(["scancel", job], check=True)
    run = make_run(tmp_path)
    run.update_state("train", status="running", job_ids=[job])
    deadline = time.time() + 60
    while time.time() < deadline:
        assert main(["status", str(run.root), "--json"]) == 0
        train = json.loads(capsys.readouterr().out)["stages"][0]
        if train["scheduler"]:
            break
        time.sleep(2)
    assert train["scheduler"] == f"SLURM job {job} CANCELLED"


def _complete_checkpoint(run: RunDir, step: int) -> None:
    folder = run.train_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text(f"{step}\n")


def test_a_running_stage_without_a_recent_heartbeat_is_shown_stale(tmp_path, capsys):
    from llava_cluster.rundir import STALE_AFTER_SECONDS

    run = make_run(tmp_path)
    run.mark_running("train")
    _complete_checkpoint(run, 4)
    run.beat("train")
    assert main(["status", str(run.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["stale"] is None  # alive: fresh heartbeat, our pid
    beat = json.loads(run.heartbeat_path("train").read_text())
    beat["time"] -= STALE_AFTER_SECONDS + 60
    run.heartbeat_path("train").write_text(json.dumps(beat))
    assert main(["status", str(run.root), "--json"]) == 0
    minutes = int((STALE_AFTER_SECONDS + 60) // 60)
    assert json.loads(capsys.readouterr().out)["stages"][0]["stale"] == (
        f"stale — no heartbeat for {minutes} min, the job probably died; resubmit to resume from checkpoint-4")
    assert main(["status", str(run.root)]) == 0
    assert "stale" in capsys.readouterr().out


def test_a_running_stage_whose_process_is_gone_is_stale_at_once(tmp_path, capsys):
    import sys

    run = make_run(tmp_path)
    run.mark_running("merge")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    beat = {"pid": int(dead.stdout), "host": __import__("socket").gethostname(), "time": time.time()}
    run.heartbeat_path("merge").write_text(json.dumps(beat))
    assert main(["status", str(run.root), "--json"]) == 0
    merge = json.loads(capsys.readouterr().out)["stages"][1]
    assert merge["stale"] == (f"stale — its process (pid {beat['pid']} on {beat['host']}) is gone, the job died; "
                              "resubmit to run it again")


def _spec_file(tmp_path: Path, folder: str = ".") -> Path:
    path = tmp_path / folder / "my-spec.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": "r1", "storage": str(tmp_path), "model": {"base": str(tmp_path / "m")},
                                    "data": {"train": str(tmp_path / "t.json"), "image_folder": str(tmp_path)}}))
    return path


def test_status_finds_the_run_from_its_spec_file_or_its_name(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path)
    RunDir(tmp_path / "runs" / "r2").root.mkdir()
    (tmp_path / "runs" / "r2" / "spec.yaml").write_text("name: r2\n")
    run.update_state("train", status="succeeded")
    spec = _spec_file(tmp_path)

    def shown(*argv: str) -> str:
        assert main(["status", *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["run"]

    assert shown(str(spec)) == str(run.root)
    assert main(["status", str(spec), "--json", "name=r2"]) == 0  # an override after the options
    assert json.loads(capsys.readouterr().out)["run"] == str(tmp_path / "runs" / "r2")
    assert shown("r1", "--storage", str(tmp_path)) == str(run.root)
    monkeypatch.chdir(tmp_path)
    _spec_file(tmp_path, "jobs")  # ./jobs/my-spec.yaml says name: r1
    assert shown("r1") == str(run.root)
    assert main(["status", "no-such-run"]) == 2
    assert "not a run directory, a spec file, or the name of a spec in ./jobs/" in capsys.readouterr().err
