"""`llava-cluster train SPEC` (train_local.py): `submit` restricted to the train stage on this machine."""

from __future__ import annotations

import yaml

from llava_cluster.cli import main


def test_train_runs_only_the_train_stage_locally_and_takes_overrides(tmp_path, tiny_dir, capsys):
    spec = {"name": "t", "storage": str(tmp_path / "storage"), "model": {"base": str(tiny_dir.model)},
            "data": {"train": str(tiny_dir.train), "eval": str(tiny_dir.val), "image_folder": str(tiny_dir.images)},
            "resources": {"gpus_per_node": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))

    assert main(["train", str(path), "--dry-run", "name=only-train"]) == 0
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "run only-train" in out and "stages: train (local, dry run)" in out  # not train -> merge -> validate
    assert not (tmp_path / "storage" / "runs" / "only-train" / "spec.yaml").exists()  # a dry run writes nothing
