"""`plan` against GPU peaks measured on an H200 (/work/shared/GPU.md) and against real model sizes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml

from llava_cluster.cli import main
from llava_cluster.plan import GIB, PRESETS, Setup, estimate, largest_batch, lora_params, shape_from_config

# Peak torch.cuda.max_memory_allocated (GiB): single H200, plain transformers + PEFT (no ZeRO), sdpa,
# bf16, LoRA r=128 alpha=256 dropout 0.05 on all LM linears + trainable projector, fused AdamW.
MEASURED = [
    ("7b", "lora", 16, 832, True, 26.3),
    ("7b", "lora", 8, 832, False, 84.6),
    ("7b", "lora", 16, 1600, True, 34.4),
    ("7b", "qlora", 16, 832, True, 23.3),
    ("13b", "qlora", 4, 2048, True, 26.1),
]


@pytest.mark.parametrize("model,method,batch,length,ckpt,measured", MEASURED)
def test_plan_agrees_with_measured_gpu_peaks(model, method, batch, length, ckpt, measured):
    setup = Setup(method=method, batch=batch, max_length=length, checkpointing=ckpt, zero=0, world=1)
    peak = estimate(PRESETS[model], setup).peak / GIB
    assert abs(peak / measured - 1) <= 0.15, f"estimated {peak:.1f} GiB vs measured {measured} GiB"


def meta_llava(shape):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied)
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=16,
                              image_size=shape.image_size, patch_size=shape.patch_size)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision))


@pytest.mark.parametrize("preset", ["7b", "13b"])
def test_parameter_counts_match_the_real_model(preset):
    shape = PRESETS[preset]
    model = meta_llava(shape)
    counted = shape.lm_linear_params() + shape.lm_other_params() + shape.vision_params() + shape.projector_params()
    assert counted == sum(p.numel() for p in model.parameters())
    assert shape.projector_params() == sum(p.numel() for p in model.model.multi_modal_projector.parameters())


def test_lora_parameter_count_matches_peft(tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from llava_cluster.spec import DEFAULT_LORA_TARGETS

    config = json.loads((tiny_dir.model / "config.json").read_text())
    shape = shape_from_config(config)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir.model)
    assert shape.lm_linear_params() + shape.lm_other_params() + shape.vision_params() + shape.projector_params() \
        == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=DEFAULT_LORA_TARGETS))
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora == lora_params(shape, Setup(r=8))
    # GPU.md's 7B run: "341M trainable params" (LoRA r=128 + projector)
    assert round((lora_params(PRESETS["7b"], Setup()) + PRESETS["7b"].projector_params()) / 1e6) == 341


def test_zero3_partitions_weights_and_zero2_does_not():
    shape = PRESETS["13b"]
    one = estimate(shape, Setup(zero=3, world=1))
    eight = estimate(shape, Setup(zero=3, world=8))
    assert eight.weights == pytest.approx(one.weights / 8)
    assert eight.trainable < one.trainable / 4
    z2 = estimate(shape, Setup(zero=2, world=8))
    assert z2.weights == pytest.approx(one.weights)
    assert z2.trainable < estimate(shape, Setup(zero=2, world=1)).trainable
    offload = estimate(shape, Setup(zero=3, world=8, offload=True))
    assert offload.trainable < eight.trainable


def test_qlora_weights_are_about_a_quarter_and_checkpointing_saves_memory():
    shape = PRESETS["13b"]
    lora = estimate(shape, Setup(zero=2, world=1))
    qlora = estimate(shape, Setup(method="qlora", zero=2, world=1))
    assert 0.2 < qlora.weights / lora.weights < 0.45  # NF4 LM, fp32 embeddings/vision
    assert estimate(shape, Setup(checkpointing=False)).peak > 3 * estimate(shape, Setup()).peak


def test_largest_batch_is_the_boundary():
    shape, setup = PRESETS["7b"], Setup(zero=0, world=1, max_length=2048)
    best = largest_batch(shape, setup, 80)
    assert best >= 1
    assert estimate(shape, replace(setup, batch=best)).total <= 80 * GIB
    assert estimate(shape, replace(setup, batch=best + 1)).total > 80 * GIB
    assert largest_batch(shape, setup, 10) == 0  # the weights alone do not fit


def write_spec(tmp_path, base, **resources):
    spec = {"name": "plan-test", "storage": str(tmp_path), "model": {"base": str(base)},
            "data": {"train": str(tmp_path / "train.json"), "max_length": 2048},
            "resources": {"nodes": 2, "gpus_per_node": 8, "gpu_type": "A100-40GB", **resources}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cli_plan_json_verdict_and_exit_codes(tmp_path, capsys):
    spec = write_spec(tmp_path, tmp_path / "no-such-model")
    assert main(["plan", str(spec), "--model-shape", "13b", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] and result["gpu"] == {"type": "A100-40GB", "memory_gib": 39.4, "count": 16}
    assert result["setup"]["zero"] == 3 and result["largest_batch"] >= 16
    assert result["gib"]["total"] <= 39.4

    assert main(["plan", str(spec), "--model-shape", "13b", "--gpu-memory", "2", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["largest_batch"] == 0

    assert main(["plan", str(spec)]) == 2  # no config.json at model.base
    err = capsys.readouterr().err
    assert "--model-shape 13b|7b|next-mistral-7b|next-vicuna-13b|onevision-qwen2-0.5b|onevision-qwen2-7b" in err
    assert all(name in err for name in PRESETS)
    spec = write_spec(tmp_path, tmp_path, gpu_type="TPU-v5")
    assert main(["plan", str(spec), "--model-shape", "7b"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err


def test_cli_plan_reads_the_base_config(tiny_dir, tmp_path, capsys):
    spec = write_spec(tmp_path, tiny_dir.model, gpu_type="H100-80GB")
    assert main(["plan", str(spec), "-o", "optim.per_device_batch=4"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "largest per-device batch" in out


def test_llava_next_shape_counts_its_anyres_tiles(tiny_next_dir, tiny_dir):
    """v1.6's five pinpoints: at most a 2x2 (or 3x1) grid + the base image = 5 tower passes per image."""
    shape = shape_from_config(json.loads((tiny_next_dir.model / "config.json").read_text()))
    assert shape.image_tiles == 5 and shape.kv_heads == 1
    assert shape_from_config(json.loads((tiny_dir.model / "config.json").read_text())).image_tiles == 1
    assert PRESETS["next-mistral-7b"].image_tiles == 5 and PRESETS["next-mistral-7b"].kv_heads == 8


# The Qwen2 text models of llava-onevision-qwen2-0.5b/7b-ov-hf (their hub cards; Qwen2Config's defaults
# are neither).
ONEVISION_TEXT = {
    "onevision-qwen2-0.5b": dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "onevision-qwen2-7b": dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


@pytest.mark.parametrize("preset", sorted(ONEVISION_TEXT))
def test_onevision_presets_are_what_plan_reads_from_their_config(preset):
    """A full-size OneVision config.json with the fields the OneVision fixture sets (SigLIP without its
    head at the tower's 384 px from LlavaOnevisionConfig's default, the 6x6 pinpoints, anyres_max_9):
    plan reads the preset's shape, the tower's 36 grid tiles + the base image included."""
    from llava_onevision_fixture import pinpoints
    from transformers import LlavaOnevisionConfig, Qwen2Config

    text = ONEVISION_TEXT[preset]
    config = LlavaOnevisionConfig(text_config=Qwen2Config(**text), vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, image_grid_pinpoints=pinpoints(384),
                                  vision_aspect_ratio="anyres_max_9",
                                  tie_word_embeddings=text["tie_word_embeddings"]).to_dict()
    assert config["vision_config"]["vision_use_head"] is False
    assert shape_from_config(config) == PRESETS[preset]
    assert PRESETS[preset].image_tiles == 37 and PRESETS[preset].image_tokens == 27 * 27  # SigLIP: no CLS
