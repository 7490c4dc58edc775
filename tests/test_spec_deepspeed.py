"""The DeepSpeed setup a spec resolves to (spec/deepspeed.py): preset or user JSON + overrides, read the
same way by spec validation, `plan` and the config training hands to DeepSpeed; what cannot run is refused
when the spec is loaded."""

from __future__ import annotations

import json

import pytest
from test_spec_load import write

from llava_cluster.cli import main
from llava_cluster.errors import UserError
from llava_cluster.spec import deepspeed_setup, load_spec

USER_JSON = {"bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
             "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}


@pytest.mark.parametrize("deepspeed, overrides, stage, offload", [
    ("zero3", {"zero_optimization": {"stage": 2}}, 2, False),
    ("zero2", {"zero_optimization": {"stage": 3}}, 3, False),
    ("zero3", {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, 3, True),
    ("zero3_offload", {"zero_optimization": {"offload_optimizer": {"device": "none"},
                                             "offload_param": {"device": "none"}}}, 3, False),
    ("user.json", {}, 3, True),
    ("user.json", {"zero_optimization": {"stage": 2}}, 2, True),
])
def test_plan_and_training_agree_on_the_zero_stage_and_offload(tmp_path, capsys, deepspeed, overrides, stage,
                                                                offload):
    """`plan` once ignored deepspeed_overrides and estimated ZeRO-3 for a run that trained under ZeRO-2."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    if deepspeed == "user.json":
        deepspeed = str(tmp_path / "user.json")
        (tmp_path / "user.json").write_text(json.dumps(USER_JSON))
    path = write(tmp_path, training={"deepspeed": deepspeed, "deepspeed_overrides": overrides})
    assert main(["plan", str(path), "--model-shape", "7b", "--json"]) in (0, 1)
    planned = json.loads(capsys.readouterr().out)["setup"]
    # what the HF Trainer reads from the config training builds (is_deepspeed_zero3_enabled, offload)
    trained = HfDeepSpeedConfig(deepspeed_setup(load_spec(path).training).config)
    assert (planned["zero"], planned["offload"]) == (stage, offload)
    assert (trained.get_value("zero_optimization.stage"), trained.is_offload()) == (stage, offload)


@pytest.mark.parametrize("deepspeed, stage, refused", [("zero2", 3, True), ("zero3", 2, False)])
def test_qlora_device_map_under_zero3_is_refused_by_the_stage_overrides_give(tmp_path, deepspeed, stage, refused):
    path = write(tmp_path, method="qlora", training={
        "deepspeed": deepspeed, "device_map": True, "deepspeed_overrides": {"zero_optimization": {"stage": stage}}})
    if refused:
        with pytest.raises(UserError, match="QLoRA with training.device_map=true cannot run under ZeRO-3"):
            load_spec(path)
    else:
        assert load_spec(path).training.device_map is True


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_an_optimizer_or_scheduler_in_deepspeed_overrides_is_refused_at_load(tmp_path, section):
    with pytest.raises(UserError) as err:
        load_spec(write(tmp_path, training={"deepspeed_overrides": {section: {"type": "AdamW"}}}))
    assert f"training.deepspeed_overrides: defines its own '{section}'" in err.value.message


def test_a_user_deepspeed_json_with_its_own_optimizer_is_refused_by_the_same_rule(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    path = write(tmp_path, training={"deepspeed": str(ds)})
    spec = load_spec(path)
    ds.write_text('{"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}')
    message = f"training.deepspeed: {ds} defines its own 'optimizer'"
    with pytest.raises(UserError, match=message):
        load_spec(path)  # at submit, not when the job starts
    with pytest.raises(UserError, match=message):
        deepspeed_setup(spec.training)  # the job's own check (train/run.py) of the same file


@pytest.mark.parametrize("content, expected", [
    ('{"zero_optimization": {"stage": 3', "is not valid JSON"),
    ('[{"zero_optimization": {"stage": 3}}]', "is not a JSON object"),
    ('{"zero_optimization": {"stage": 4}}', "sets zero_optimization.stage=4; ZeRO stages are 0, 1, 2 and 3"),
    ('{"bf16": {"enabled": true}}', 'sets bf16.enabled=true but training.precision is fp16; set it to "auto"'),
    ('{"fp16": {"enabled": false}}', 'sets fp16.enabled=false but training.precision is fp16'),
])
def test_a_user_deepspeed_json_that_cannot_run_is_refused_at_load_naming_the_file(tmp_path, content, expected):
    ds = tmp_path / "ds.json"
    ds.write_text(content)
    with pytest.raises(UserError) as err:
        load_spec(write(tmp_path, training={"deepspeed": str(ds), "precision": "fp16"}))
    assert f"training.deepspeed: {ds} " in err.value.message and expected in err.value.message


def test_a_precision_the_config_fixes_in_agreement_passes(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"bf16": {"enabled": true}, "fp16": {"enabled": false}, "zero_optimization": {"stage": 2}}')
    assert load_spec(write(tmp_path, training={"deepspeed": str(ds), "precision": "bf16"})).training.precision == "bf16"
    with pytest.raises(UserError, match="sets bf16.enabled=false but training.precision is bf16"):
        load_spec(write(tmp_path, training={"deepspeed_overrides": {"bf16": {"enabled": False}}}))


def test_a_user_json_not_visible_here_is_left_to_preflight_and_the_job(tmp_path, capsys):
    """On Kubernetes the JSON may live on the cluster's volume only: the spec still loads."""
    missing = tmp_path / "on-the-cluster" / "ds.json"
    path = write(tmp_path, training={"deepspeed": str(missing)})
    assert load_spec(path).training.deepspeed == str(missing)
    assert main(["plan", str(path), "--model-shape", "7b"]) == 2
    assert f"training.deepspeed: file not found: {missing}" in capsys.readouterr().err
