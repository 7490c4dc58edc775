"""Model families (model/family.py, model/onevision_processor.py): LLaVA-OneVision (llava_onevision) end
to end on the tiny base of tests/llava_onevision_fixture.py (llava-onevision-qwen2-0.5b-ov-hf's config
fields, the real Qwen BPE tokenizer): the images-only processor and its anyres_max_9 counts, ChatML
masking, tiles through dataset and collator, LoRA/QLoRA trainables (image_newline beside the projector),
merge in memory and streamed with --verify, `data check --model` and `preview`. The 2-rank ZeRO-3 LoRA
`train` and the QLoRA `submit` (train -> merge -> validate) are the slow tests at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from llava_onevision_fixture import ASPECTS, SIDE
from PIL import Image

from llava_cluster.cli import main
from llava_cluster.model.family import FAMILIES
from llava_cluster.model.load import image_tokens, load_llava, load_processor, model_family

REPO = Path(__file__).resolve().parents[1]
CHATML = "chatml"


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    from llava_onevision_fixture import build_tiny_onevision

    return build_tiny_onevision(tmp_path_factory.mktemp("tiny-ov"))


@pytest.fixture(scope="module")
def ov_processor(ov_dir):
    return load_processor(ov_dir.model)


def image_token_count(processor, image) -> int:
    """What the processor expands one `<image>` to for this image."""
    out = processor(text=["<image>\nhi"], images=[image], return_tensors="pt")
    return int((out["input_ids"] == processor.image_token_id).sum())


def test_family_processor_and_anyres_max_9_counts(ov_dir, ov_processor):
    """The family is from config.json; the processor loads without a video processor and saves the stock
    layout; counts from sizes are the processor's own expansion, and a 6x6 grid is scaled down."""
    assert model_family(ov_dir.model) is FAMILIES["llava_onevision"]
    assert FAMILIES["llava_onevision"].default_template == CHATML
    assert not hasattr(ov_processor, "video_processor")
    saved = json.loads((ov_dir.model / "processor_config.json").read_text())
    assert saved["processor_class"] == "LlavaOnevisionProcessor"
    assert (saved["num_image_tokens"], saved["vision_feature_select_strategy"], saved["vision_aspect_ratio"]) == (
        16, "full", "anyres_max_9")
    counter = image_tokens(ov_processor, ov_dir.model)
    sizes = (*ASPECTS, (33, 70), (200, 31))
    counts = {size: counter.for_size(*size) for size in sizes}
    assert counts == {size: image_token_count(ov_processor, Image.new("RGB", size)) for size in sizes}
    # 16 base features (no CLS) + 4x4 grid + 4 newlines; the 6x6 grid's 24x24 features at ratio 2 -> 12x12 + 12
    assert counter.square == counts[(SIDE, SIDE)] == 16 + 16 + 4
    assert counts[(168, 168)] == 16 + 12 * 12 + 12
    assert len(set(counts.values())) == len(sizes), counts


@pytest.fixture(scope="module")
def ov_dataset(ov_dir, ov_processor):
    from llava_cluster.data.dataset import LazySupervisedDataset
    from llava_cluster.data.templates import get_template

    return LazySupervisedDataset(ov_dir.train, ov_dir.images, ov_processor, get_template(CHATML), 512)


def test_dataset_counts_tiles_and_chatml_masking_with_the_real_tokenizer(ov_dataset, ov_processor):
    """Header counts = the item's image run; tiles per image differ; the supervised ids are exactly each
    reply + `<|im_end|>` in Qwen's vocabulary, nothing of the ChatML headers."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    from llava_cluster.data.encode import IGNORE_INDEX

    tok = ov_processor.tokenizer
    tiles = set()
    for i in [k for k, flag in enumerate(ov_dataset.is_image) if flag][:len(ASPECTS)]:
        item = ov_dataset[i]
        with Image.open(ov_dataset.images.path(ov_dataset.record(i)["image"])) as img:
            width, height = img.size
        assert int((item["input_ids"] == ov_processor.image_token_id).sum()) == ov_dataset.image_counts[i]
        assert item["image_sizes"].tolist() == [height, width]
        n = image_size_to_num_patches((height, width), ov_processor.image_processor.image_grid_pinpoints, SIDE)
        assert item["pixel_values"].shape == (n, 3, SIDE, SIDE)
        tiles.add(n)
        replies = [t["value"] for t in ov_dataset.record(i)["conversations"] if t["from"] == "gpt"]
        want = [t for r in replies for t in tok(r + "<|im_end|>", add_special_tokens=False)["input_ids"]]
        assert [label for label in item["labels"].tolist() if label != IGNORE_INDEX] == want
    assert tiles == {2, 4, 5, 37}
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645  # Qwen2's id too


@pytest.fixture(scope="module")
def ov_model(ov_dir):
    return load_llava(ov_dir.model).eval()


def test_padded_tiles_of_a_batch_change_no_logits(ov_dataset, ov_model, ov_processor):
    from llava_cluster.data.collator import LlavaCollator

    collate = LlavaCollator(ov_processor.tokenizer.pad_token_id)
    picks = [k for k, flag in enumerate(ov_dataset.is_image) if flag][:3] + [ov_dataset.is_image.index(False)]
    items = [ov_dataset[i] for i in picks]
    batch = collate(items)
    assert batch["pixel_values"].shape[:2] == (3, 4)
    with torch.no_grad():
        together = ov_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, item in enumerate(items):
            alone = ov_model(**{k: v for k, v in collate([item]).items() if k != "labels"}).logits[0]
            torch.testing.assert_close(together[row, :len(alone)], alone, atol=1e-5, rtol=1e-5)


def ov_spec(ov_dir, tmp_path, method: str = "lora", precision: str = "fp32"):
    from llava_cluster.spec import RunSpec

    return RunSpec.model_validate({
        "name": "ov", "storage": str(tmp_path), "method": method,
        "model": {"base": str(ov_dir.model)}, "data": {"train": str(ov_dir.train)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "training": {"precision": precision, "deepspeed": "zero2"},
    })


def test_lora_and_qlora_train_projector_and_image_newline_and_leave_siglip_frozen(ov_dir, tmp_path):
    from llava_cluster.train.model_setup import build_model

    model = build_model(ov_spec(ov_dir, tmp_path))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    full = [n for n in trainable if "lora_" not in n]
    assert full and all("multi_modal_projector" in n or n.endswith("model.image_newline") for n in full)
    assert any(n.endswith("model.image_newline") for n in full)
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all("language_model" in n for n in lora)
    assert not any("vision_tower" in n or "embed_tokens" in n for n in trainable)
    qlora = build_model(ov_spec(ov_dir, tmp_path, "qlora", "bf16"))
    quantized = [n for n, m in qlora.named_modules() if type(m).__name__ == "Linear4bit"]
    assert quantized and all("language_model" in n for n in quantized)
    assert {p.dtype for p in qlora.parameters() if p.requires_grad} == {torch.bfloat16}


@pytest.fixture(scope="module")
def ov_adapter(ov_dir, tmp_path_factory):
    """A LoRA adapter + trained projector and image_newline as training saves them (B non-zero)."""
    from adapter_fixture import perturbed_adapter

    tmp = tmp_path_factory.mktemp("ov-adapter")
    return perturbed_adapter(ov_spec(ov_dir, tmp), tmp / "final", {"base": str(ov_dir.model), "template": CHATML, "method": "lora"})


@pytest.mark.parametrize("streaming", [False, True])
def test_merge_verified_equals_base_plus_adapter_which_stock_peft_loads(ov_adapter, ov_dir, tmp_path, streaming):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlavaOnevisionForConditionalGeneration

    from llava_cluster.adapter import apply_projector
    from llava_cluster.merge.run import merge_adapter
    from llava_cluster.merge.verify import probe_inputs

    result = merge_adapter(ov_adapter, tmp_path / "merged", dtype="fp32", verify=True, streaming=streaming)
    assert result.verification == ("tensors" if streaming else "logits")
    merged = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    saved = load_file(str(ov_adapter / "non_lora_trainables.safetensors"))
    assert torch.equal(merged.model.image_newline.detach(), saved["model.image_newline"])
    reference = load_llava(ov_dir.model)
    assert not torch.equal(reference.model.image_newline.detach(), saved["model.image_newline"])
    apply_projector(reference, ov_adapter)
    reference = PeftModel.from_pretrained(reference, str(ov_adapter)).eval()  # stock PEFT loads the adapter
    batch = probe_inputs(load_processor(tmp_path / "merged"), CHATML)
    assert "image_sizes" in batch
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, reference(**batch).logits, atol=1e-4, rtol=1e-4)


def test_data_check_and_preview_count_each_image_with_chatml(ov_dir, ov_dataset, capsys):
    """`data check --model` flags exactly the samples whose token counts, with their own image's count,
    cross the limit; `preview` renders ChatML (the family's default) with the dataset's ids."""
    records = json.loads(ov_dir.train.read_text())
    big = [k for k, r in enumerate(records) if r.get("image")][len(ASPECTS) - 1]  # 168 px: capped 6x6 grid
    exact = [len(ov_dataset[k]["input_ids"]) for k in range(len(ov_dataset))]  # max_length 512 cuts none
    limit = exact[big] - 1
    over = [k for k, n in enumerate(exact) if n > limit]
    assert big in over and len(over) < sum(ov_dataset.is_image)
    code = main(["data", "check", str(ov_dir.train), "--model", str(ov_dir.model), "--image-folder",
                 str(ov_dir.images), "--max-length", str(limit), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["tokens"]["template"] == CHATML
    flagged = [d for d in report["defects"] if d["kind"] in ("too_long", "first_round_too_long")]
    assert sorted(d["id"] for d in flagged) == sorted(records[k]["id"] for k in over)
    message = next(d["message"] for d in flagged if d["id"] == records[big]["id"])
    assert f"{exact[big]} tokens (image = {ov_dataset.image_counts[big]})" in message
    assert main(["data", "preview", str(ov_dir.train), "--model", str(ov_dir.model), "--image-folder",
                 str(ov_dir.images), "--index", str(big), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["template"] == CHATML and out["text"].startswith("<|im_start|>system\n")
    assert out["input_ids"] == ov_dataset[big]["input_ids"].tolist()


def submitted(tmp_path: Path, ov_dir, name: str, stages: tuple[str, ...] = ("train", "merge", "validate"),
              **sections) -> Path:
    """Run `train` or `submit --backend local` of a spec on the OneVision base; assert every stage succeeded."""
    spec = {
        "name": name, "storage": str(tmp_path / "storage"), "method": "lora",
        "model": {"base": str(ov_dir.model), "template": CHATML},  # a spec's default is vicuna_v1
        "data": {"train": str(ov_dir.train), "eval": str(ov_dir.val), "image_folder": str(ov_dir.images),
                 "max_length": 256, "num_workers": 0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "optim": {"lr": 2e-3, "projector_lr": 1e-3, "max_steps": 1, "warmup_ratio": 0.0, "per_device_batch": 1,
                  "seed": 7},
        "training": {"deepspeed": "zero3", "precision": "fp32", "gradient_checkpointing": False,
                     "save_steps": 1, "logging_steps": 1,
                     "deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
        "resources": {"nodes": 1, "gpus_per_node": 2},
        "merge": {"dtype": "fp32", "verify": True},
        "validation": {"max_samples": 2, "batch_size": 2, "max_new_tokens": 2},
    }
    for key, value in sections.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = ["train", str(path)] if stages == ("train",) else ["submit", str(path), "--backend", "local"]
    proc = subprocess.run([sys.executable, "-m", "llava_cluster.cli", *command],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    run = tmp_path / "storage" / "runs" / name
    for stage in stages:
        assert json.loads((run / "state" / f"{stage}.json").read_text())["status"] == "succeeded"
    return run


def saved_non_lora(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "train" / "final" / "non_lora_trainables.safetensors"))


@pytest.mark.slow
def test_two_ranks_zero3_lora_train_a_llava_onevision_base(tmp_path, ov_dir):
    """`train` (local, 2 CPU ranks, ZeRO-3, LoRA): the trained image_newline and projector are gathered
    whole and saved, changed from the base's."""
    run = submitted(tmp_path, ov_dir, "ov-z3", stages=("train",))
    saved = saved_non_lora(run)
    base = load_llava(ov_dir.model)
    assert saved["model.image_newline"].shape == base.model.image_newline.shape
    assert not torch.equal(saved["model.image_newline"], base.model.image_newline.detach())
    weight = "model.multi_modal_projector.linear_1.weight"
    assert saved[weight].shape == base.get_parameter(weight).shape
    assert not torch.equal(saved[weight], base.get_parameter(weight).detach())


@pytest.mark.slow
def test_submit_one_rank_qlora_zero2_then_verified_merge_and_validate(tmp_path, ov_dir):
    """QLoRA (4-bit Qwen2, ZeRO-2, one rank): train -> merge --verify -> validate of the merged model
    against the base on the held-out samples; the merged checkpoint holds the trained image_newline.
    fp32 compute: a CPU's bf16 matmuls over Qwen's 152k-row head cost ~25 s a micro-batch here (the
    bf16 QLoRA path runs in the llava_next pipeline)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    run = submitted(tmp_path, ov_dir, "ov-qlora", method="qlora",
                    training={"deepspeed": "zero2"}, resources={"gpus_per_node": 1})
    saved = saved_non_lora(run)
    merged = LlavaOnevisionForConditionalGeneration.from_pretrained(run / "merged")
    assert torch.equal(merged.model.image_newline.detach(), saved["model.image_newline"])
    assert not torch.equal(saved["model.image_newline"], load_llava(ov_dir.model).model.image_newline.detach())
    info = json.loads((run / "merged" / "llava_cluster_merge.json").read_text())
    assert info["method"] == "qlora" and info["verification"] != "none"
    metrics = json.loads((run / "validate" / "metrics.json").read_text())
    assert (metrics["samples"], metrics["template"], Path(metrics["model"])) == (2, CHATML, run / "merged")
    assert all(torch.isfinite(torch.tensor(metrics[m]["eval_loss"])) for m in ("base", "finetuned"))
    assert len((run / "validate" / "predictions.jsonl").read_text().splitlines()) == 2
