"""`llava-cluster logs`: a stage's log (its tail, a SLURM task's console), found from the run directory, its
spec file or its name; a stage without a log says so."""

from __future__ import annotations

import yaml

from llava_cluster.cli import main
from llava_cluster.rundir import RunDir


def test_logs_of_a_run_given_by_its_spec_file_or_name(tmp_path, capsys):
    run = RunDir(tmp_path / "runs" / "r1")
    run.logs_dir.mkdir(parents=True)
    run.spec_path.write_text("name: r1\n")
    run.log_path("train").write_text("".join(f"line {i}\n" for i in range(10)))
    run.update_state("train", status="succeeded")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "r1", "storage": str(tmp_path), "model": {"base": str(tmp_path / "m")},
                                    "data": {"train": str(tmp_path / "t.json"), "image_folder": str(tmp_path)}}))
    assert main(["logs", str(spec), "train", "-n", "2"]) == 0
    assert capsys.readouterr().out == "line 8\nline 9\n"
    assert main(["logs", "r1", "train", "--storage", str(tmp_path), "-n", "1"]) == 0
    assert capsys.readouterr().out == "line 9\n"
    assert main(["logs", str(run.root), "train", "-n", "1"]) == 0
    assert capsys.readouterr().out == "line 9\n"


def test_logs_prints_the_tail_and_the_job_console(tmp_path, capsysbinary):
    run = RunDir(tmp_path / "run")
    run.logs_dir.mkdir(parents=True)
    run.log_path("train").write_text("".join(f"line {i}\n" for i in range(10)))
    run.update_state("train", status="running", job_ids=["5", "9"])
    (run.logs_dir / "slurm").mkdir()
    (run.logs_dir / "slurm/9_1_log.out").write_text("rank 1 says hi\n")
    assert main(["logs", str(run.root), "train", "--tail", "2"]) == 0
    assert capsysbinary.readouterr().out == b"line 8\nline 9\n"
    assert main(["logs", str(run.root), "train", "--job", "--task", "1"]) == 0
    assert capsysbinary.readouterr().out == b"rank 1 says hi\n"


def test_logs_of_a_stage_without_log_says_so(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.update_state("merge", status="pending", job_ids=["12"])
    assert main(["logs", str(run.root), "merge"]) == 1
    assert "no log yet for merge" in capsys.readouterr().err
    assert main(["logs", str(tmp_path / "nope"), "merge"]) == 2
