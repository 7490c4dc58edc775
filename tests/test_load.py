"""Loading a checkpoint (model/load.py): 4-bit only where QLoRA wants it, dtypes, and a named refusal of
anything that is not an HF LLaVA folder (original-layout checkpoints point to `convert original`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_cluster.errors import UserError
from llava_cluster.model.load import load_llava, load_processor


def test_load_in_4bit_quantizes_only_the_language_model(tiny_dir):
    import bitsandbytes as bnb
    import torch

    model = load_llava(tiny_dir.model, load_in_4bit=True)
    quantized = [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all(name.startswith("model.language_model.layers.") for name in quantized)
    for module in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2, model.lm_head):
        assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.vision_tower.modules())
    model.model.multi_modal_projector.linear_1.weight.requires_grad_(True)  # trainable, as QLoRA needs


def test_load_llava_full_precision(tiny_dir):
    import torch

    model = load_llava(tiny_dir.model, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.config.image_token_index == load_processor(tiny_dir.model).tokenizer.convert_tokens_to_ids("<image>")


def _model_dir(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "llama", "hidden_size": 64}, "is a 'llama' model, not a LLaVA one"),
        ({"model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu"},
         "original-layout LLaVA checkpoint"),
        ({"model_type": "llava_llama", "hidden_size": 64}, "original-layout LLaVA checkpoint"),
    ],
)
def test_load_llava_rejects_other_models_with_a_clear_message(tmp_path, config, expected):
    folder = _model_dir(tmp_path, config)
    with pytest.raises(UserError) as err:
        load_llava(folder)
    assert expected in err.value.message and str(folder) in err.value.message
    if "original" in expected:
        assert "llava-cluster convert original" in err.value.message
    with pytest.raises(UserError):
        load_processor(folder)


def test_load_llava_missing_path_and_missing_config(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_llava(tmp_path / "nope")
    with pytest.raises(UserError, match="has no config.json"):
        load_llava(tmp_path)
