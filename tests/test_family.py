"""Model families (model/family.py): LLaVA-NeXT (llava_next) end to end on a tiny random base built
here with llava-v1.6-mistral's config fields: family from config.json, the processor's per-image token
count from the image size, any-resolution tiles through dataset, collator and packing, LoRA/QLoRA
trainables (image_newline beside the projector), merge in memory and streamed with --verify, and
validate. The QLoRA `submit` of the whole pipeline is the slow test at the end; the 2-rank ZeRO-3 LoRA
train of this base is the LLaVA-NeXT recipe's in tests/test_recipes.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from llava_next_fixture import ASPECTS
from PIL import Image

from llava_cluster.errors import UserError
from llava_cluster.model.family import FAMILIES, family_of
from llava_cluster.model.load import image_tokens, load_llava, load_processor, model_family

REPO = Path(__file__).resolve().parents[1]
MISTRAL = "mistral_instruct"


def image_token_count(processor, image) -> int:
    """What the family's own processor expands one `<image>` to for this image."""
    out = processor(text=["<image>\nhi"], images=[image], return_tensors="pt")
    return int((out["input_ids"] == processor.image_token_id).sum())


def test_family_comes_from_config_json_not_the_folder_name(tmp_path, tiny_next_dir, tiny_dir):
    misleading = tmp_path / "llava-1.5-7b-hf"
    shutil.copytree(tiny_next_dir.model, misleading)
    assert model_family(misleading) is FAMILIES["llava_next"]
    assert model_family(tiny_dir.model) is FAMILIES["llava"]
    assert type(load_llava(misleading)).__name__ == "LlavaNextForConditionalGeneration"


def test_an_unsupported_family_is_refused_with_the_exact_list():
    with pytest.raises(UserError) as err:
        family_of({"model_type": "llava_next_video"})
    assert err.value.message == (
        "model_type 'llava_next_video' is not a family llava-cluster fine-tunes; supported: "
        "LlavaForConditionalGeneration (model_type 'llava'), "
        "LlavaNextForConditionalGeneration (model_type 'llava_next'), "
        "LlavaOnevisionForConditionalGeneration (model_type 'llava_onevision')")


@pytest.fixture(scope="module")
def next_processor(tiny_next_dir):
    return load_processor(tiny_next_dir.model)


def test_image_tokens_per_image_are_the_processors_own_count(next_processor, tiny_next_dir):
    counter = image_tokens(next_processor, tiny_next_dir.model)
    sizes = (*ASPECTS, (33, 70), (64, 64), (200, 31))
    counts = {size: counter.for_size(*size) for size in sizes}
    assert counts == {size: image_token_count(next_processor, Image.new("RGB", size)) for size in sizes}
    assert len(set(counts.values())) >= 5, counts  # lengths really vary per image
    assert counter.square == counts[(32, 32)] == 36  # 16 base + 2x1 grid of 4x4 unpadded (8x4) + 4 newlines


@pytest.fixture(scope="module")
def next_dataset(tiny_next_dir, next_processor):
    from llava_cluster.data.dataset import LazySupervisedDataset
    from llava_cluster.data.templates import get_template

    return LazySupervisedDataset(tiny_next_dir.train, tiny_next_dir.images, next_processor, get_template(MISTRAL),
                                 512)


def test_dataset_counts_from_headers_match_the_items_and_tile_counts_differ(next_dataset, next_processor):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tiles = set()
    for i in [k for k, flag in enumerate(next_dataset.is_image) if flag][:8]:
        item = next_dataset[i]
        with Image.open(next_dataset.images.path(next_dataset.record(i)["image"])) as img:
            width, height = img.size
        assert int((item["input_ids"] == next_processor.image_token_id).sum()) == next_dataset.image_counts[i]
        assert item["image_sizes"].tolist() == [height, width]
        n = image_size_to_num_patches((height, width), next_processor.image_processor.image_grid_pinpoints, 32)
        assert item["pixel_values"].shape == (n, 3, 32, 32)
        tiles.add(n)
    assert tiles == {3, 4, 5}


@pytest.fixture(scope="module")
def next_model(tiny_next_dir):
    return load_llava(tiny_next_dir.model).eval()


def mixed_items(ds, n: int = 4) -> list[dict]:
    picks = [k for k, flag in enumerate(ds.is_image) if flag][:n] + [ds.is_image.index(False)]
    return [ds[i] for i in picks]


def test_padded_tiles_of_a_batch_change_no_logits(next_dataset, next_model, next_processor):
    from llava_cluster.data.collator import LlavaCollator

    collate = LlavaCollator(next_processor.tokenizer.pad_token_id)
    items = mixed_items(next_dataset)
    batch = collate(items)
    assert batch["pixel_values"].shape[:2] == (4, 5) and batch["image_sizes"].shape == (4, 2)
    with torch.no_grad():
        together = next_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, item in enumerate(items):
            alone = next_model(**{k: v for k, v in collate([item]).items() if k != "labels"}).logits[0]
            torch.testing.assert_close(together[row, :len(alone)], alone, atol=1e-5, rtol=1e-5)


def test_packed_rows_with_tiles_give_the_unpacked_loss(next_dataset, next_model, next_processor):
    from llava_cluster.data.collator import LlavaCollator
    from llava_cluster.train.packing import PackedCollator

    items = mixed_items(next_dataset)
    pad = next_processor.tokenizer.pad_token_id
    with torch.no_grad():
        plain = next_model(**LlavaCollator(pad)(items), use_cache=False).loss
        # no cache, as in training: a cache turns transformers' packed-sequence masks off
        packed = next_model(**PackedCollator(pad)([items[:3], items[3:]]), use_cache=False).loss
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_the_blank_image_of_a_text_only_multi_rank_batch_has_tiles_and_changes_no_loss(next_dataset, next_model,
                                                                                        next_processor, packed):
    """ImageInEveryBatch with the dataset's blank image: the tower runs (ZeRO-3's gathers on every rank),
    the batch carries image_sizes for its tiles, and the loss is the text-only batch's."""
    from llava_cluster.data.collator import LlavaCollator
    from llava_cluster.train.packing import PackedCollator
    from llava_cluster.train.trainer import ImageInEveryBatch

    pad = next_processor.tokenizer.pad_token_id
    texts = [next_dataset[i] for i, flag in enumerate(next_dataset.is_image) if not flag][:2]
    collate, items = (PackedCollator(pad), [texts]) if packed else (LlavaCollator(pad), texts)
    batch = ImageInEveryBatch(collate, next_dataset.blank_image_item())(items)
    assert batch["pixel_values"].shape == (1, 3, 3, 32, 32) and batch["image_sizes"].tolist() == [[32, 32]]
    with torch.no_grad():
        torch.testing.assert_close(next_model(**batch, use_cache=False).loss,
                                   next_model(**collate(items), use_cache=False).loss, atol=1e-5, rtol=1e-5)


def test_mistral_template_masking_with_the_real_tokenizer_and_anyres_counts(tmp_path, tiny_next_dir):
    """Mistral-7B's SentencePiece vocabulary (tests/real_tokenizers 'llama2'), the tiny anyres image
    processor: the image run is the processor's count for that image, the supervised ids are exactly
    each reply + `</s>`, and nothing of `[INST] ... [/INST]` is supervised."""
    from real_tokenizers import load_real_tokenizer
    from transformers import LlavaNextProcessor

    from llava_cluster.data.dataset import LazySupervisedDataset
    from llava_cluster.data.templates import get_template

    tok = load_real_tokenizer("llama2", extra_special=("<image>",))
    tok.pad_token = tok.unk_token
    image_processor = load_processor(tiny_next_dir.model).image_processor
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    Image.new("RGB", (96, 20), (200, 30, 30)).save(tmp_path / "wide.png")
    replies = ["A red bar.", "12 of them."]
    sample = {"id": "w", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": replies[0]},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": replies[1]}]}
    (tmp_path / "d.json").write_text(json.dumps([sample]))
    ds = LazySupervisedDataset(tmp_path / "d.json", tmp_path, processor, get_template(MISTRAL), None)
    item = ds[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == image_token_count(processor, Image.new("RGB", (96, 20))) == ds.image_counts[0]
    want = [i for r in replies for i in tok(r + "</s>", add_special_tokens=False)["input_ids"]]
    assert [label for label in labels if label != -100] == want
    inst = tok("[INST]", add_special_tokens=False)["input_ids"]
    assert all(labels[k] == -100 for k in range(len(ids)) if ids[k:k + len(inst)] == inst)


def next_spec(tiny_next_dir, tmp_path, method: str = "lora", precision: str = "fp32"):
    from llava_cluster.spec import RunSpec

    return RunSpec.model_validate({
        "name": "next", "storage": str(tmp_path), "method": method,
        "model": {"base": str(tiny_next_dir.model), "template": MISTRAL}, "data": {"train": str(tiny_next_dir.train)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "training": {"precision": precision, "deepspeed": "zero2"},
    })


def test_lora_trains_projector_and_image_newline_with_lora_on_the_language_model_only(tiny_next_dir, tmp_path):
    from llava_cluster.train.model_setup import build_model, trainable_summary

    model = build_model(next_spec(tiny_next_dir, tmp_path))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    full = [n for n in trainable if "lora_" not in n]
    assert full and all("multi_modal_projector" in n or n.endswith("model.image_newline") for n in full)
    assert any(n.endswith("model.image_newline") for n in full)
    assert all("language_model" in n for n in trainable if "lora_" in n)
    assert not any("vision_tower" in n for n in trainable)
    hidden = model.config.text_config.hidden_size
    projector = sum(p.numel() for n, p in model.named_parameters() if "multi_modal_projector" in n)
    assert trainable_summary(model)["projector"] == projector + hidden


def test_qlora_quantizes_the_language_model_only(tiny_next_dir, tmp_path):
    from llava_cluster.train.model_setup import build_model

    model = build_model(next_spec(tiny_next_dir, tmp_path, "qlora", "bf16"))
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all("language_model" in n for n in quantized)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("model.image_newline") for n in trainable)
    assert set(trainable.values()) == {torch.bfloat16}


@pytest.fixture(scope="module")
def next_adapter(tiny_next_dir, tmp_path_factory):
    """A LoRA adapter + trained projector and image_newline as training saves them (B non-zero)."""
    from adapter_fixture import perturbed_adapter

    tmp = tmp_path_factory.mktemp("next-adapter")
    return perturbed_adapter(next_spec(tiny_next_dir, tmp), tmp / "final", {"base": str(tiny_next_dir.model), "template": MISTRAL, "method": "lora"})


def test_saved_non_lora_trainables_hold_the_projector_and_image_newline(next_adapter, tiny_next_dir):
    from peft import PeftModel
    from safetensors.torch import load_file

    saved = load_file(str(next_adapter / "non_lora_trainables.safetensors"))
    assert "model.image_newline" in saved and any("multi_modal_projector" in k for k in saved)
    base = load_llava(tiny_next_dir.model)
    assert not torch.equal(saved["model.image_newline"], base.model.image_newline.detach())
    peft = PeftModel.from_pretrained(base, str(next_adapter))  # stock PEFT loads the adapter
    assert any("lora_A" in n for n, _ in peft.named_parameters())


@pytest.mark.parametrize("streaming", [False, True])
def test_merge_verified_loads_with_the_stock_class_and_equals_base_plus_adapter(next_adapter, tiny_next_dir,
                                                                                  tmp_path, streaming):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlavaNextForConditionalGeneration

    from llava_cluster.adapter import apply_projector
    from llava_cluster.merge.run import merge_adapter
    from llava_cluster.merge.verify import probe_inputs

    result = merge_adapter(next_adapter, tmp_path / "merged", dtype="fp32", verify=True, streaming=streaming)
    assert result.verification == ("tensors" if streaming else "logits")
    merged = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    saved = load_file(str(next_adapter / "non_lora_trainables.safetensors"))
    assert torch.equal(merged.model.image_newline.detach(), saved["model.image_newline"])
    reference = load_llava(tiny_next_dir.model)
    apply_projector(reference, next_adapter)
    reference = PeftModel.from_pretrained(reference, str(next_adapter)).eval()
    batch = probe_inputs(load_processor(tmp_path / "merged"), MISTRAL)
    assert "image_sizes" in batch
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, reference(**batch).logits, atol=1e-4, rtol=1e-4)


def test_validate_scores_the_merged_llava_next(next_adapter, tiny_next_dir, tmp_path):
    from llava_cluster.cli import main
    from llava_cluster.merge.run import merge_adapter

    merge_adapter(next_adapter, tmp_path / "merged", dtype="fp32", verify=False, streaming=True)
    assert main(["validate", "--model", str(tmp_path / "merged"), "--data", str(tiny_next_dir.val),
                 "--image-folder", str(tiny_next_dir.images), "--out", str(tmp_path / "v"), "--template", MISTRAL,
                 "--max-samples", "4", "--batch-size", "4", "--max-new-tokens", "3"]) == 0
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert metrics and (tmp_path / "v" / "predictions.jsonl").is_file()


def submitted(tmp_path: Path, tiny_next_dir, name: str, **sections) -> Path:
    """`llava-cluster submit SPEC --backend local` of a few steps; train, merge and validate must succeed.
    (The 2-rank ZeRO-3 LoRA train of a llava_next base is tests/test_recipes.py's LLaVA-NeXT recipe.)"""
    import os

    spec = {
        "name": name, "storage": str(tmp_path / "storage"), "method": "lora",
        "model": {"base": str(tiny_next_dir.model), "template": MISTRAL},
        "data": {"train": str(tiny_next_dir.train), "eval": str(tiny_next_dir.val),
                 "image_folder": str(tiny_next_dir.images), "max_length": 256, "num_workers": 0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "optim": {"lr": 2e-3, "projector_lr": 1e-3, "max_steps": 3, "per_device_batch": 2, "seed": 7},
        "training": {"deepspeed": "zero3", "precision": "fp32", "gradient_checkpointing": False,
                     "save_steps": 3, "logging_steps": 1,
                     "deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
        "resources": {"nodes": 1, "gpus_per_node": 2},
        "merge": {"dtype": "fp32", "verify": True},
        "validation": {"max_samples": 4, "batch_size": 4, "max_new_tokens": 3},
    }
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "llava_cluster.cli", "submit", str(path), "--backend", "local"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    run = tmp_path / "storage" / "runs" / name
    for stage in ("train", "merge", "validate"):
        assert json.loads((run / "state" / f"{stage}.json").read_text())["status"] == "succeeded"
    assert json.loads((run / "merged" / "llava_cluster_merge.json").read_text())["verification"] != "none"
    assert json.loads((run / "validate" / "metrics.json").read_text())
    return run


def load_file_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_submit_one_rank_qlora_zero2_then_verified_merge_and_validate(tmp_path, tiny_next_dir):
    """QLoRA (4-bit language model, ZeRO-2, one rank) of a llava_next base: train -> merge --verify ->
    validate; the merged checkpoint holds the trained image_newline."""
    from transformers import LlavaNextForConditionalGeneration

    run = submitted(tmp_path, tiny_next_dir, "next-qlora", method="qlora",
                    training={"deepspeed": "zero2", "precision": "bf16"}, resources={"gpus_per_node": 1})
    saved = load_file_dict(run / "train" / "final" / "non_lora_trainables.safetensors")
    assert saved["model.image_newline"].dtype == torch.bfloat16
    merged = LlavaNextForConditionalGeneration.from_pretrained(run / "merged")
    assert torch.equal(merged.model.image_newline.detach(), saved["model.image_newline"].float())
    assert json.loads((run / "merged" / "llava_cluster_merge.json").read_text())["method"] == "qlora"
