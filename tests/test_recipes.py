"""Every shipped recipe in jobs/ trains, scaled down: the real file's precision, ZeRO stage, gradient
checkpointing, method (LoRA / QLoRA) and optimizer groups, with only the sizes shrunk.

The base of the 13B recipes is the llava-hf miniature (tests/llava_hf_fixture.py: fp16, sharded, the
hub's key layout, the real Llama-2 tokenizer); the LLaVA-NeXT recipe's is the tiny llava_next base
(tests/llava_next_fixture.py: images of several aspect ratios, so the two ranks get different tile counts,
and image_newline trains beside the projector); tiny-local keeps its own tiny model. Multi-rank recipes
run on 2 CPU ranks, ZeRO-3 with the persistence threshold at 0 so that every parameter is really
partitioned. The train set is exactly one global batch, so each step sees the same samples and the
loss must fall. The precision rule is checked where it matters: saved trainables in the compute dtype,
DeepSpeed's master copy of them in fp32 (read back with its own zero_to_fp32). Also: the llava-hf
miniature loads through our loader as it is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import stage

from llava_cluster.precision import torch_dtype
from llava_cluster.spec import RunSpec, deepspeed_setup
from llava_cluster.spec.paths import field_value

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (REPO / "jobs").glob("*.yaml"))
STEPS = 3  # the first runs at learning rate 0 (the recipes' warmup): two real updates
RANKS = 2
BATCH = 1  # per rank
MAX_R = 8
BASES = {"tiny-local.yaml": "tiny_dir", "llava-next-mistral-7b-lora.yaml": "tiny_next_dir"}  # else llava_hf_dir


def test_every_recipe_is_covered():
    assert RECIPES == ["llava-next-mistral-7b-lora.yaml", "lora-13b-multinode.yaml", "qlora-13b-1node.yaml",
                       "tiny-local.yaml"]


def test_llava_hf_miniature_loads_as_it_is(llava_hf_dir):
    from llava_cluster.model.load import image_seq_length, load_llava, load_processor

    files = {p.name for p in llava_hf_dir.model.iterdir()}
    assert {"model.safetensors.index.json", "model-00001-of-00003.safetensors", "preprocessor_config.json",
            "processor_config.json", "chat_template.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    index = json.loads((llava_hf_dir.model / "model.safetensors.index.json").read_text())
    assert {k.split(".")[0] for k in index["weight_map"]} == {"language_model", "vision_tower", "multi_modal_projector"}

    processor = load_processor(llava_hf_dir.model)
    tok = processor.tokenizer
    assert image_seq_length(processor) == 576
    assert (tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, len(tok)) == (32000, 32001, 32002)
    assert tok("USER:").input_ids == [1, 2223, 725, 28747]  # <s> ▁US ER : (the real Llama-2 vocabulary)

    model = load_llava(llava_hf_dir.model)
    assert image_seq_length(model.config) == 576
    assert model.model.language_model.embed_tokens.weight.shape[0] == 32064
    stored = load_file(str(llava_hf_dir.model / index["weight_map"]["multi_modal_projector.linear_1.weight"]))
    assert stored["multi_modal_projector.linear_1.weight"].dtype == torch.float16
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight.half(),
                       stored["multi_modal_projector.linear_1.weight"]), "older key layout not mapped on load"


def one_global_batch(src: Path, dst: Path) -> Path:
    """The first RANKS × BATCH samples with an image: every step trains on exactly these."""
    records = [r for r in json.loads(src.read_text()) if "image" in r][: RANKS * BATCH]
    dst.write_text(json.dumps(records))
    return dst


def scaled(recipe: str, tmp: Path, base) -> RunSpec:
    """The shipped spec with only its sizes (and paths) replaced."""
    from llava_cluster.spec import load_spec

    shipped = load_spec(REPO / "jobs" / recipe)
    r = min(shipped.lora.r, MAX_R)
    overrides = [
        f"storage={tmp / 'storage'}", f"model.base={base.model}",
        f"data.train={one_global_batch(base.train, tmp / 'train.json')}", f"data.eval={base.val}",
        f"data.image_folder={base.images}", "data.num_workers=0",
        f"lora.r={r}", f"lora.alpha={shipped.lora.alpha * r / shipped.lora.r}",
        f"optim.max_steps={STEPS}", f"optim.per_device_batch={BATCH}", "optim.grad_accum=1",
        f"training.save_steps={STEPS}", "training.logging_steps=1",
        "resources.nodes=1", f"resources.gpus_per_node={RANKS if shipped.world_size > 1 else 1}",
    ]
    if deepspeed_setup(shipped.training).stage == 3:
        overrides.append("training.deepspeed_overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}")
    spec = load_spec(REPO / "jobs" / recipe, overrides)
    kept = ("method", "model.template", "data.image_aspect_ratio", "data.max_length", "lora.dropout",
            "lora.target_modules", "optim.lr", "optim.projector_lr", "optim.scheduler", "optim.warmup_ratio",
            "optim.weight_decay", "training.precision", "training.deepspeed", "training.gradient_checkpointing",
            "training.device_map", "training.packing")
    assert {k: field_value(spec, k) for k in kept} == {k: field_value(shipped, k) for k in kept}
    return spec


@pytest.mark.parametrize("recipe", RECIPES)
def test_scaling_changes_only_sizes_and_paths(recipe, tmp_path, llava_hf_dir):
    spec = scaled(recipe, tmp_path, llava_hf_dir)
    assert (spec.world_size, spec.optim.max_steps, spec.optim.per_device_batch) == (RANKS, STEPS, BATCH)
    zero3 = deepspeed_setup(spec.training).stage == 3
    assert zero3 == (recipe != "qlora-13b-1node.yaml")
    assert spec.training.deepspeed_overrides == (
        {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if zero3 else {})


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_recipe_trains_scaled_down(recipe, tmp_path, request, capsys):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel

    from llava_cluster.adapter import PEFT_PREFIX
    from llava_cluster.model.load import load_llava
    from llava_cluster.rundir import RunDir
    from llava_cluster.spec.frozen import freeze

    base = request.getfixturevalue(BASES.get(recipe, "llava_hf_dir"))
    spec = scaled(recipe, tmp_path, base)
    run = RunDir(spec.run_dir)
    freeze(spec, run)
    started = time.monotonic()
    proc = stage("train", run.root, timeout=900)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]

    rows = [json.loads(line) for line in (run.logs_dir / "train_metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    with capsys.disabled():
        print(f"\n{recipe}: {spec.method} {spec.training.precision} {spec.training.deepspeed} "
              f"gc={spec.training.gradient_checkpointing} x{spec.world_size} ranks: {STEPS} steps, "
              f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, {wall:.1f} s")

    final = run.final_dir
    dtype = torch_dtype(spec.training.precision)
    projector = load_file(str(final / "non_lora_trainables.safetensors"))
    newline = {"model.image_newline"} if recipe.startswith("llava-next") else set()
    assert set(projector) == {f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
                              } | newline
    assert {t.dtype for t in projector.values()} == {dtype}
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and {t.dtype for t in adapter.values()} == {dtype}
    assert all("language_model" in k for k in adapter), "LoRA leaked onto the vision tower"

    # DeepSpeed's fp32 master copy holds exactly the trainables; the saved projector is its rounding.
    checkpoint = run.train_dir / f"checkpoint-{STEPS}"
    master = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), exclude_frozen_parameters=True)
    saved = load_file(str(checkpoint / "non_lora_trainables.safetensors"))
    assert len(master) == len(saved) + len(load_file(str(checkpoint / "adapter_model.safetensors")))
    assert {t.dtype for t in master.values()} == {torch.float32}
    for key, value in saved.items():
        assert torch.equal(master[PEFT_PREFIX + key].to(dtype), value), key

    reference = load_llava(spec.model.base)
    before = reference.model.multi_modal_projector.linear_1.weight.detach().to(dtype)
    trained = projector["model.multi_modal_projector.linear_1.weight"]
    assert trained.shape == before.shape and not torch.equal(trained, before), "projector did not train"
    if newline:  # gathered whole from its ZeRO-3 partitions, and trained
        untrained = reference.model.image_newline.detach().to(dtype)
        assert projector["model.image_newline"].shape == untrained.shape
        assert not torch.equal(projector["model.image_newline"], untrained), "image_newline did not train"
    model = PeftModel.from_pretrained(reference, str(final))
    assert model.peft_config["default"].r == spec.lora.r
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b), "LoRA B loaded as zeros"
