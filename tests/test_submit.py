"""`submit` (submit.py): a dry run prints the stages and writes nothing; a hostile spec is refused before
any backend renders a script or manifest."""

from __future__ import annotations

import pytest
import yaml
from test_spec_load import write
from test_spec_text import NEWLINE_PAYLOAD, with_value

from llava_cluster.cli import main


def test_submit_dry_run_local_prints_stages_and_writes_nothing(tmp_path, tiny_dir, capsys):
    path = write(tmp_path, model={"base": str(tiny_dir.model)},
                 data={"train": str(tiny_dir.train), "eval": str(tiny_dir.val), "image_folder": str(tiny_dir.images)})
    assert main(["submit", str(path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "train -> merge -> validate" in captured.err  # the header goes to stderr, commands to stdout
    assert "stage train --run-dir" in captured.out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("backend", ["local", "slurm", "k8s"])
def test_every_backend_refuses_a_hostile_spec_before_rendering_anything(tmp_path, backend, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for dotted in ("resources.mem", "slurm.partition", "storage", "env"):
        path = tmp_path / "hostile.yaml"
        path.write_text(yaml.safe_dump(with_value(tmp_path, dotted, NEWLINE_PAYLOAD)))
        assert main(["submit", str(path), "--backend", backend, "--dry-run"]) == 2
        captured = capsys.readouterr()
        assert dotted in captured.err and "control character" in captured.err and "#SBATCH" not in captured.out
    assert not list(tmp_path.glob("PWNED*"))
