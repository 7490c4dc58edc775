"""Which spec fields are paths (spec/paths.py): made absolute at load against the current directory,
at any depth (validation.lmms_eval.include_path), an interpreter only when it is a path and without
following its link out of its environment; the same list is what Kubernetes wants on its volume."""

from __future__ import annotations

import os
import sys

from test_spec_load import write

from llava_cluster.spec import load_spec, local_paths


def test_relative_paths_in_the_lmms_eval_block_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "env" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / "env" / "bin" / "python")
    block = {"tasks": ["mme"], "include_path": "~/tasks", "python": "env/bin/python"}
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    spec = load_spec(write(tmp_path, validation={"lmms_eval": block}), ["data.eval=rel/v.json"])
    assert spec.validation.lmms_eval.include_path == str(tmp_path / "home" / "tasks")
    assert spec.validation.lmms_eval.python == str(tmp_path / "env" / "bin" / "python")  # the link, kept
    assert spec.data.eval == str(tmp_path / "rel" / "v.json")
    named = load_spec(write(tmp_path, validation={"lmms_eval": {"tasks": ["mme"], "python": "python3"}}))
    assert named.validation.lmms_eval.python == "python3"  # a name on PATH where the stage runs
    assert load_spec(write(tmp_path)).validation.lmms_eval is None  # no block: nothing to resolve


def test_local_paths_are_every_set_path_field_and_a_deepspeed_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    spec = load_spec(write(tmp_path, validation={"lmms_eval": {"tasks": ["mme"], "include_path": "tasks",
                                                                "python": "/opt/lmms/bin/python"}},
                           model={"base": "hf://org/llava"}, training={"deepspeed": "ds.json"}))
    assert local_paths(spec) == {
        "storage": str(tmp_path), "data.train": str(tmp_path / "t.json"),
        "validation.lmms_eval.include_path": str(tmp_path / "tasks"),
        "training.deepspeed": str(tmp_path / "ds.json")}  # no URL, no unset field, no interpreter
    assert "training.deepspeed" not in local_paths(load_spec(write(tmp_path)))  # a preset name
