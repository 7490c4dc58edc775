"""An original-repo LoRA output converts to our layout and merges to the same weights as our adapter."""

from __future__ import annotations

import json
import re

import pytest
import torch
from adapter_fixture import assert_bitwise_equal, loaded_state, make_adapter, peft_merge
from safetensors.torch import load_file

from llava_cluster.cli import main
from llava_cluster.convert.adapter import convert_adapter
from llava_cluster.errors import UserError
from llava_cluster.merge.streaming import streaming_merge

ORIGINAL_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def to_original(ours, out):
    """Write our adapter's values the way haotian-liu/LLaVA's `--lora_enable` run saves them."""
    out.mkdir()
    lora = load_file(ours / "adapter_model.safetensors")
    torch.save({k.replace(".model.language_model.layers.", ".model.layers."): v for k, v in lora.items()},
               out / "adapter_model.bin")
    projector = load_file(ours / "non_lora_trainables.safetensors")
    torch.save({"base_model.model." + k.replace("multi_modal_projector.linear_1", "mm_projector.0")
                .replace("multi_modal_projector.linear_2", "mm_projector.2"): v for k, v in projector.items()},
               out / "non_lora_trainables.bin")
    ours_cfg = json.loads((ours / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "lmsys/vicuna-7b-v1.5", "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "lora_alpha": ours_cfg["lora_alpha"],
        "lora_dropout": 0.05, "modules_to_save": None, "peft_type": "LORA", "r": ours_cfg["r"],
        "revision": None, "target_modules": ORIGINAL_TARGETS, "task_type": "CAUSAL_LM",
        "enable_lora": None, "merge_weights": False,  # keys of older PEFT releases
    }))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_dir.model, root / "ours", r=8, alpha=16.0, seed=3)
    return root / "ours", to_original(root / "ours", root / "original")


def test_converted_adapter_equals_ours_and_merges_to_the_same_weights(tiny_dir, adapters, tmp_path):
    ours, original = adapters
    report = convert_adapter(original, tiny_dir.model, tmp_path / "converted", allow_pickle=True)
    conv = tmp_path / "converted"

    assert report["lora_tensors"] == len(load_file(ours / "adapter_model.safetensors")) > 0
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        got, want = load_file(conv / name), load_file(ours / name)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    cfg = json.loads((conv / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_dir.model)
    assert re.fullmatch(cfg["target_modules"], "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(cfg["target_modules"], "model.vision_tower.encoder.layers.0.self_attn.q_proj")
    meta = json.loads((conv / "llava_cluster.json").read_text())
    assert (meta["base"], meta["method"], meta["lora"]["r"], meta["lora"]["alpha"]) == (str(tiny_dir.model), "lora", 8, 16.0)
    assert list(conv.glob("*.bin")) == []

    streaming_merge(tiny_dir.model, conv, tmp_path / "m_conv", progress=False)
    streaming_merge(tiny_dir.model, ours, tmp_path / "m_ours", progress=False)
    merged = loaded_state(tmp_path / "m_conv", torch.float32)
    assert_bitwise_equal(merged, loaded_state(tmp_path / "m_ours", torch.float32))
    # PEFT itself reads the converted adapter (its config included) and merges to the same weights.
    assert_bitwise_equal(merged, peft_merge(tiny_dir.model, conv, torch.float32))


def test_pickles_are_read_only_with_the_flag(tiny_dir, adapters, tmp_path):
    _, original = adapters
    with pytest.raises(UserError, match="adapter_model.bin is a pickle.*--allow-pickle"):
        convert_adapter(original, tiny_dir.model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_projector_file_is_an_error_not_a_silent_base_projector(tiny_dir, adapters, tmp_path):
    _, original = adapters
    src = tmp_path / "src"
    src.mkdir()
    for name in ("adapter_config.json", "adapter_model.bin"):
        (src / name).write_bytes((original / name).read_bytes())
    with pytest.raises(UserError, match="non_lora_trainables.bin.*projector"):
        convert_adapter(src, tiny_dir.model, tmp_path / "out", allow_pickle=True)


def test_adapter_of_another_model_size_is_refused(tiny_dir, adapters, tmp_path):
    _, original = adapters
    src = tmp_path / "src"
    src.mkdir()
    for f in original.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    lora = torch.load(src / "adapter_model.bin", weights_only=True)
    key = next(k for k in lora if "q_proj.lora_A" in k)
    lora[key] = torch.zeros(lora[key].shape[0], lora[key].shape[1] * 2)
    torch.save(lora, src / "adapter_model.bin")
    with pytest.raises(UserError, match="does not fit the base"):
        convert_adapter(src, tiny_dir.model, tmp_path / "out", allow_pickle=True)


def test_cli_convert_adapter(tiny_dir, adapters, tmp_path, capsys):
    _, original = adapters
    argv = ["convert", "adapter", str(original), "--base", str(tiny_dir.model), "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main([*argv, "--allow-pickle", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["projector_tensors"] == 4
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
