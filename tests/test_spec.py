"""Run specs: defaults, overrides, and one clear message (no traceback) for each bad spec or path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llava_cluster.cli import main
from llava_cluster.errors import UserError
from llava_cluster.spec import DEFAULT_LORA_TARGETS, check_inputs_exist, load_spec

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, **body) -> Path:
    base = {"name": "r1", "storage": str(tmp_path), "model": {"base": str(tmp_path / "m")},
            "data": {"train": str(tmp_path / "t.json")}}
    base.update(body)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_defaults_are_the_llava_recipe(tmp_path):
    spec = load_spec(write(tmp_path))
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (128, 256, 0.05)
    assert (spec.optim.lr, spec.optim.projector_lr, spec.optim.warmup_ratio) == (2e-4, 2e-5, 0.03)
    assert spec.optim.scheduler == "cosine" and spec.optim.weight_decay == 0
    assert spec.training.deepspeed == "zero3" and spec.lora.target_modules == DEFAULT_LORA_TARGETS
    assert spec.run_dir == tmp_path / "runs" / "r1"


def test_overrides_parse_yaml_values_and_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write(tmp_path), ["optim.lr=1e-4", "resources.nodes=2", "data.train=rel/t.json",
                                       "training.gradient_checkpointing=false"])
    assert spec.optim.lr == 1e-4 and spec.resources.nodes == 2
    assert spec.data.train == str(tmp_path / "rel" / "t.json")
    assert spec.training.gradient_checkpointing is False


@pytest.mark.parametrize("body, overrides, expected", [
    ({}, ["method=qlora", "resources.nodes=2", "training.deepspeed=zero2"], "QLoRA runs on one node"),
    ({}, ["method=qlora", "training.deepspeed=zero3", "training.device_map=true"], "training.deepspeed=zero2"),
    ({}, ["optim.lrr=1"], "optim.lrr: unknown key"),
    ({}, ["model.template=vicuna"], "unknown template 'vicuna'"),
    ({}, ["training.deepspeed=zero4"], "neither a preset"),
    ({}, ["name=Bad_Name"], "name"),
    ({}, ["merge.into=dequantized"], "only applies to method=qlora"),
    ({}, ["optim.lr"], "is not key=value"),
    ({"data": None}, [], "data: required, missing"),
])
def test_bad_specs_name_the_field_and_the_fix(tmp_path, body, overrides, expected):
    path = write(tmp_path, **body)
    if body.get("data", 0) is None:
        text = yaml.safe_load(path.read_text())
        del text["data"]
        path.write_text(yaml.safe_dump(text))
    with pytest.raises(UserError) as err:
        load_spec(path, overrides)
    assert expected in err.value.message


def test_missing_inputs_are_named(tmp_path):
    spec = load_spec(write(tmp_path))
    with pytest.raises(UserError, match="model.base: dir not found"):
        check_inputs_exist(spec)
    (tmp_path / "m").mkdir()
    with pytest.raises(UserError, match="data.train: file not found"):
        check_inputs_exist(spec)
    (tmp_path / "t.json").write_text("[]")
    with pytest.raises(UserError, match="no config.json"):
        check_inputs_exist(spec)


@pytest.mark.parametrize("args, expected", [
    (["submit", "nope.yaml"], "run spec not found: nope.yaml"),
    (["status", "/nonexistent/run"], "run directory not found"),
    (["merge", "--adapter", "/nonexistent", "--out", "/tmp/x"], "adapter folder not found"),
    (["stage", "train", "--run-dir", "/nonexistent/run"], "has no spec.yaml"),
])
def test_cli_user_errors_exit_2_without_traceback(args, expected):
    proc = subprocess.run([sys.executable, "-m", "llava_cluster.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_submit_dry_run_local_prints_stages_and_writes_nothing(tmp_path, tiny_dir, capsys):
    path = write(tmp_path, model={"base": str(tiny_dir.model)},
                 data={"train": str(tiny_dir.train), "eval": str(tiny_dir.val), "image_folder": str(tiny_dir.images)})
    assert main(["submit", str(path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "train -> merge -> validate" in captured.err  # the header goes to stderr, commands to stdout
    assert "stage train --run-dir" in captured.out
    assert not (tmp_path / "runs").exists()


def test_resubmitting_a_different_spec_under_the_same_name_is_refused(tmp_path, tiny_dir):
    from llava_cluster.rundir import RunDir
    from llava_cluster.submit import freeze

    path = write(tmp_path, model={"base": str(tiny_dir.model)}, data={"train": str(tiny_dir.train)})
    spec = load_spec(path)
    freeze(spec, RunDir(spec.run_dir))
    freeze(spec, RunDir(spec.run_dir))  # the same spec again: fine
    with pytest.raises(UserError, match="different spec .*optim"):
        freeze(load_spec(path, ["optim.lr=1e-3"]), RunDir(spec.run_dir))


def test_stage_spec_freeze_non_rank0_waits_for_rank0(tmp_path, monkeypatch):
    """Pods of a PyTorchJob start together: a worker must wait for rank 0's spec.yaml, not fail."""
    import threading
    import time

    from llava_cluster.rundir import RunDir
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
