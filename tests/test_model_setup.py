"""The trainable model's shape and precision: LoRA on the language model, the projector trainable, and
every trainable tensor in the compute dtype (one dtype: DeepSpeed flattens them into one buffer).
The end-to-end proof under DeepSpeed is tests/test_recipes.py; this is the fast, single-process check."""

from __future__ import annotations

import pytest
import torch

from llava_cluster.spec import RunSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def spec_for(tiny_dir, tmp_path, precision: str, method: str = "lora") -> RunSpec:
    return RunSpec.model_validate({
        "name": "setup", "storage": str(tmp_path), "method": method,
        "model": {"base": str(tiny_dir.model)}, "data": {"train": str(tiny_dir.train)},
        "lora": {"r": 4, "alpha": 8}, "training": {"precision": precision, "deepspeed": "zero2"},
    })


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_every_trainable_is_in_the_compute_dtype(precision, tiny_dir, tmp_path):
    from llava_cluster.train.model_setup import build_model

    model = build_model(spec_for(tiny_dir, tmp_path, precision))
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("multi_modal_projector" in n for n in trainable)
    assert set(trainable.values()) == {DTYPES[precision]}, trainable


def test_qlora_trainables_are_in_the_compute_dtype_after_kbit_preparation(tiny_dir, tmp_path):
    """prepare_model_for_kbit_training upcasts the unquantized weights to fp32; the rule still holds."""
    from llava_cluster.train.model_setup import build_model

    model = build_model(spec_for(tiny_dir, tmp_path, "bf16", method="qlora"))
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules()), "the language model is not 4-bit"
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("multi_modal_projector" in n for n in trainable)
    assert set(trainable.values()) == {torch.bfloat16}, trainable


@pytest.mark.parametrize("deepspeed, stage, device_map", [("zero3", 2, {"": 3}), ("zero2", 3, None), ("zero2", 2, {"": 3})])
def test_qlora_places_each_ranks_model_unless_the_stage_the_spec_resolves_to_is_zero3(
        monkeypatch, tiny_dir, tmp_path, deepspeed, stage, device_map):
    """The stage counts with deepspeed_overrides: ZeRO-3 partitions the weights as they load (no device_map)."""
    from llava_cluster.train.model_setup import qlora_device_map

    spec = RunSpec.model_validate({
        "name": "setup", "storage": str(tmp_path), "method": "qlora",
        "model": {"base": str(tiny_dir.model)}, "data": {"train": str(tiny_dir.train)},
        "training": {"deepspeed": deepspeed, "deepspeed_overrides": {"zero_optimization": {"stage": stage}}},
    })
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert qlora_device_map(spec, local_rank=3) == device_map
