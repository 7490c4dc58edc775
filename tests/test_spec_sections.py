"""The sections of a run spec and the rules between them (spec/sections.py): the defaults are the LLaVA
recipe, and each inconsistent spec is refused naming the field and the fix."""

from __future__ import annotations

import pytest
from test_spec_load import write

from llava_cluster.cli import main
from llava_cluster.errors import UserError
from llava_cluster.spec import DEFAULT_LORA_TARGETS, load_spec


def test_defaults_are_the_llava_recipe(tmp_path):
    spec = load_spec(write(tmp_path))
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (128, 256, 0.05)
    assert (spec.optim.lr, spec.optim.projector_lr, spec.optim.warmup_ratio) == (2e-4, 2e-5, 0.03)
    assert spec.optim.scheduler == "cosine" and spec.optim.weight_decay == 0
    assert spec.training.deepspeed == "zero3" and spec.lora.target_modules == DEFAULT_LORA_TARGETS
    assert spec.run_dir == tmp_path / "runs" / "r1"


@pytest.mark.parametrize("overrides, expected", [
    (["method=qlora", "resources.nodes=2", "training.deepspeed=zero2"], "QLoRA runs on one node"),
    (["method=qlora", "training.deepspeed=zero3", "training.device_map=true"], "training.deepspeed=zero2"),
    (["model.template=vicuna"], "unknown template 'vicuna'"),
    (["training.deepspeed=zero4"], "neither a preset"),
    (["name=Bad_Name"], "name"),
    (["merge.into=dequantized"], "only applies to method=qlora"),
])
def test_bad_specs_name_the_field_and_the_fix(tmp_path, overrides, expected):
    path = write(tmp_path)
    with pytest.raises(UserError) as err:
        load_spec(path, overrides)
    assert expected in err.value.message


def test_a_lora_target_regex_that_does_not_compile_is_refused_at_load(tmp_path):
    with pytest.raises(UserError, match=r"lora.target_modules: '\.\*\(q_proj' is not a valid regular expression"):
        load_spec(write(tmp_path, lora={"target_modules": ".*(q_proj"}))


def test_cli_prints_the_name_pattern_with_its_brackets(tmp_path, capsys):
    assert main(["submit", str(write(tmp_path, name="Bad_Name")), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "^[a-z0-9]([a-z0-9.-]{0,50}[a-z0-9])?$" in err and "Traceback" not in err
