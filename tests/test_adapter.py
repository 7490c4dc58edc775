"""adapter.py: what an adapter folder holds, written and read back; the projector applied loudly; the
lazy reader the streaming merge uses."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_fixture import make_adapter

from llava_cluster.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    PROJECTOR_FILE,
    LazyAdapter,
    apply_projector,
    check_adapter,
    is_adapter,
    load_non_lora,
    load_with_adapter,
    read_metadata,
    write_adapter,
)
from llava_cluster.errors import UserError

PREFIX = "base_model.model.model.language_model.layers.0.self_attn"


def lora_tensors(r: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"{PREFIX}.{m}.lora_A.weight": torch.randn(r, 6, generator=g) for m in ("q_proj", "v_proj")} | {
        f"{PREFIX}.{m}.lora_B.weight": torch.randn(4, r, generator=g) for m in ("q_proj", "v_proj")}


def write_small(folder, r: int = 2, alpha: float = 8.0, **cfg) -> dict[str, torch.Tensor]:
    lora = lora_tensors(r)
    write_adapter(folder, {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": {"q_proj", "v_proj"},
                           **cfg},
                  lora, {"model.multi_modal_projector.linear_1.bias": torch.ones(3)}, {"base": "/b", "step": 7})
    return lora


def test_written_adapter_reads_back_complete(tmp_path):
    write_small(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ADAPTER_FILES)
    assert check_adapter(tmp_path) == tmp_path and is_adapter(tmp_path)
    assert read_metadata(tmp_path) == {"base": "/b", "step": 7}
    assert sorted(json.loads((tmp_path / ADAPTER_CONFIG).read_text())["target_modules"]) == ["q_proj", "v_proj"]
    assert torch.equal(load_non_lora(tmp_path)["model.multi_modal_projector.linear_1.bias"], torch.ones(3))


def test_an_incomplete_or_original_layout_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="adapter folder not found"):
        check_adapter(tmp_path / "nowhere")
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    (tmp_path / "non_lora_trainables.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"missing adapter_model.safetensors, non_lora_trainables.safetensors "
                                        r"\(original LLaVA output: convert it with `llava-cluster convert adapter`\)"):
        check_adapter(tmp_path)
    assert read_metadata(tmp_path) == {}, "no metadata file: nothing recorded"


def test_projector_is_copied_in_the_model_dtype_and_a_misfit_is_refused(tmp_path):
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.multi_modal_projector = torch.nn.Module()
    model.model.multi_modal_projector.linear_1 = torch.nn.Linear(2, 3).half()
    write_small(tmp_path)
    assert apply_projector(model, tmp_path) == ["model.multi_modal_projector.linear_1.bias"]
    bias = model.model.multi_modal_projector.linear_1.bias
    assert bias.dtype == torch.float16 and torch.equal(bias, torch.ones(3, dtype=torch.float16))

    model.model.multi_modal_projector.linear_1 = torch.nn.Linear(2, 5)
    with pytest.raises(UserError, match=r"does not fit this base model.*linear_1.bias \(3,\) vs \(5,\)"):
        apply_projector(model, tmp_path)
    del model.model.multi_modal_projector
    with pytest.raises(UserError, match="does not fit this base model.*linear_1.bias"):
        apply_projector(model, tmp_path)


@pytest.mark.parametrize("rslora,scaling", [(False, 8.0 / 4), (True, 8.0 / 2)])
def test_lazy_adapter_pairs_modules_with_peft_scaling(tmp_path, rslora, scaling):
    lora = write_small(tmp_path, r=4, use_rslora=rslora)
    reader = LazyAdapter(tmp_path)
    module = "model.language_model.layers.0.self_attn.q_proj"
    assert sorted(reader.pairs) == [module, module.replace("q_proj", "v_proj")]
    assert reader.pairs[module].scaling == scaling
    want = (lora[f"base_model.model.{module}.lora_B.weight"] @ lora[f"base_model.model.{module}.lora_A.weight"]) * scaling
    assert torch.equal(reader.delta(module), want)
    assert reader.projector_keys() == {"model.multi_modal_projector.linear_1.bias"}
    (tmp_path / PROJECTOR_FILE).unlink()
    assert LazyAdapter(tmp_path).projector_keys() == set()


def test_lazy_adapter_refuses_what_it_cannot_merge(tmp_path):
    with pytest.raises(UserError, match="not an adapter folder, adapter_config.json is missing"):
        LazyAdapter(tmp_path)
    write_adapter(tmp_path, {"r": 2, "lora_alpha": 4}, {**lora_tensors(), "base_model.model.lm_head.weight":
                                                         torch.zeros(1)}, {}, {})
    with pytest.raises(UserError, match="unexpected tensor 'base_model.model.lm_head.weight'.*plain LoRA"):
        LazyAdapter(tmp_path)
    write_adapter(tmp_path, {"r": 2, "lora_alpha": 4, "fan_in_fan_out": True}, lora_tensors(), {}, {})
    with pytest.raises(UserError, match="fan_in_fan_out is not supported by the streaming merge"):
        LazyAdapter(tmp_path)


def test_base_plus_adapter_is_the_trained_model(tiny_dir, tmp_path):
    """The PEFT-wrapped base carries the trained projector and the adapter's LoRA weights, unmerged."""
    from safetensors.torch import load_file

    make_adapter(tiny_dir.model, tmp_path)
    model = load_with_adapter(tiny_dir.model, tmp_path, torch.float32)
    projector = load_non_lora(tmp_path)
    params = dict(model.base_model.model.named_parameters())
    assert projector and all(torch.equal(params[k], v) for k, v in projector.items())
    lora = load_file(tmp_path / ADAPTER_WEIGHTS)
    state = model.state_dict()
    assert lora and all(torch.equal(state[k.replace(".weight", ".default.weight")], v) for k, v in lora.items())
