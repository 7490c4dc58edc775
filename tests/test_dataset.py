"""Lazy dataset + collator against the real tiny LLaVA: items, padding to square, broken images, and a
collated batch that `LlavaForConditionalGeneration` accepts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hostile_files import make_special_files, no_hang
from PIL import Image

from llava_cluster.data.collator import LlavaCollator
from llava_cluster.data.dataset import LazySupervisedDataset, mean_colour, pad_to_square
from llava_cluster.data.encode import IGNORE_INDEX
from llava_cluster.data.templates import TEMPLATES
from llava_cluster.errors import UserError


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from llava_cluster.model.load import load_processor

    return load_processor(tiny_dir.model)


@pytest.fixture(scope="module")
def dataset(tiny_dir, processor):
    return LazySupervisedDataset(tiny_dir.train, tiny_dir.images, processor, TEMPLATES["vicuna_v1"], 256)


def test_records_lengths_and_modalities(tiny_dir, dataset):
    records = json.loads(tiny_dir.train.read_text())
    assert len(dataset) == len(records)
    assert dataset.is_image == [bool(r.get("image")) for r in records]
    assert 0 < sum(dataset.is_image) < len(dataset)  # both modalities present in the tiny data
    for k in range(len(records)):
        assert dataset.record(k) == records[k]
        text_chars = sum(len(t["value"]) for t in records[k]["conversations"])
        turns = len(records[k]["conversations"])
        assert dataset.lengths[k] == text_chars // 4 + 6 * turns + (16 if dataset.is_image[k] else 0)


def test_items_hold_expanded_image_and_pixels_only_for_image_samples(dataset, processor):
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for k in (dataset.is_image.index(True), dataset.is_image.index(False)):
        item = dataset[k]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == item["labels"].shape
        n_image = int((item["input_ids"] == image_id).sum())
        if dataset.is_image[k]:
            assert n_image == 16 and item["pixel_values"].shape == (3, 32, 32)
        else:
            assert n_image == 0 and "pixel_values" not in item
        assert (item["labels"] != IGNORE_INDEX).sum() > 0


def test_pad_to_square_uses_the_mean_colour(processor):
    colour = mean_colour(processor.image_processor)
    assert colour == (123, 117, 104)  # CLIP mean x 255
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = pad_to_square(image, colour)
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == colour and square.getpixel((39, 39)) == colour
    assert square.getpixel((20, 20)) == (255, 0, 0)


def _one_sample_dataset(tmp_path, processor, image, aspect="pad"):
    image.save(tmp_path / "wide.png")
    sample = {"id": "wide-1", "image": "wide.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(sample) + "\n")
    return LazySupervisedDataset(tmp_path / "d.jsonl", tmp_path, processor, TEMPLATES["vicuna_v1"], 256,
                                 image_aspect_ratio=aspect)


def test_padding_normalises_to_zero_and_resize_crops(tmp_path, processor):
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    padded = _one_sample_dataset(tmp_path, processor, wide)[0]["pixel_values"]
    assert padded[:, 0, :].abs().max() < 0.02  # top rows: mean colour, ~0 after normalisation
    assert padded[0, 16, 16] > 1.5  # the red image itself, in the middle
    cropped = _one_sample_dataset(tmp_path, processor, wide, aspect="resize")[0]["pixel_values"]
    assert cropped[0, 0, :].min() > 1.5  # resize + centre crop: red everywhere


def test_broken_image_names_sample_and_path(tmp_path, processor):
    ds = _one_sample_dataset(tmp_path, processor, Image.new("RGB", (8, 8)))
    (tmp_path / "wide.png").write_bytes(b"not a png")
    with pytest.raises(UserError) as err:
        ds[0]
    assert "sample wide-1" in err.value.message and str(tmp_path / "wide.png") in err.value.message


def test_bad_aspect_and_empty_file(tmp_path, processor):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(UserError, match="image_aspect_ratio"):
        LazySupervisedDataset(tmp_path / "empty.json", None, processor, TEMPLATES["plain"], 64, "square")
    with pytest.raises(UserError, match="holds no samples"):
        LazySupervisedDataset(tmp_path / "empty.json", None, processor, TEMPLATES["plain"], 64)


def test_collated_mixed_batch_trains_the_tiny_model(tiny_dir, dataset, processor):
    from transformers import LlavaForConditionalGeneration

    images = [k for k, img in enumerate(dataset.is_image) if img][:2]
    texts = [k for k, img in enumerate(dataset.is_image) if not img][:1]
    items = [dataset[k] for k in (images[0], texts[0], images[1])]
    pad = processor.tokenizer.pad_token_id
    batch = LlavaCollator(pad)(items)
    lengths = [len(i["input_ids"]) for i in items]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][1], items[2]["pixel_values"])
    for row, n in enumerate(lengths):
        assert (batch["input_ids"][row, n:] == pad).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir.model)
    loss = model(**batch).loss
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0

    text_batch = LlavaCollator(pad)([dataset[k] for k in texts])
    assert "pixel_values" not in text_batch
    assert math.isfinite(model(**text_batch).loss.item())


def test_collator_needs_a_pad_id():
    with pytest.raises(ValueError, match="pad token"):
        LlavaCollator(None)


@pytest.mark.parametrize("name", ["escape.png", "bomb.png", "fifo.png", "loop-a.png", "zero.png"])
def test_training_refuses_images_the_checker_refuses_and_names_the_sample(tmp_path, processor, name):
    folder = tmp_path / "images"
    folder.mkdir()
    expected = make_special_files(folder)
    sample = {"id": "hostile-1", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(sample) + "\n")
    ds = LazySupervisedDataset(tmp_path / "d.jsonl", folder, processor, TEMPLATES["vicuna_v1"], 256)
    with no_hang(), pytest.raises(UserError) as err:
        ds[0]
    assert "sample hostile-1" in err.value.message and name in err.value.message
    want = {"image_path_unsafe": "outside the image folder", "image_too_large": "more than the limit",
            "image_unreadable": ""}[expected[name]]
    assert want in err.value.message


def test_unencodable_text_is_refused_at_start_naming_the_sample(tmp_path, processor):
    sample = {"id": "s1", "conversations": [{"from": "human", "value": "hi \ud800"}, {"from": "gpt", "value": "x"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(sample) + "\n")
    with pytest.raises(UserError, match=r"sample #0 conversations\[0\]\.value: a lone surrogate"):
        LazySupervisedDataset(tmp_path / "d.jsonl", None, processor, TEMPLATES["vicuna_v1"], 256)


def test_a_sample_that_cannot_be_encoded_is_refused_at_start_naming_it(tmp_path, processor):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}
    hostile = {"id": "h-2", "conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "x"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(hostile) + "\n")
    with pytest.raises(UserError, match=r"sample #1 cannot be encoded: wrong_type at conversations\[0\]\.from"):
        LazySupervisedDataset(tmp_path / "d.jsonl", None, processor, TEMPLATES["vicuna_v1"], 256)
