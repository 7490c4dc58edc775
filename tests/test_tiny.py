"""The tiny model factory (tiny/build.py), its synthetic dataset (tiny/task.py) and `llava-cluster tiny`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llava_cluster.cli import main
from llava_cluster.data.templates import TEMPLATES
from llava_cluster.model.load import image_seq_length, load_processor
from llava_cluster.tiny.build import build_tiny
from llava_cluster.tiny.task import COLOURS, SHAPES


def _records(tiny_dir) -> list[dict]:
    return json.loads(tiny_dir.train.read_text()) + json.loads(tiny_dir.val.read_text())


def _turns(record: dict) -> list[tuple[str, str]]:
    return [("user" if t["from"] == "human" else "assistant", t["value"]) for t in record["conversations"]]


def test_model_reloads_and_runs_a_forward_with_16_image_tokens(tiny_dir):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_dir.model)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir.model)
    assert model.dtype == torch.float32
    assert model.config.text_config.pad_token_id == processor.tokenizer.pad_token_id
    record = next(r for r in _records(tiny_dir) if "image" in r)
    image = Image.open(tiny_dir.images / record["image"]).convert("RGB")
    inputs = processor(text=["USER: <image>\nWhat colour is the shape? ASSISTANT:"], images=[image], return_tensors="pt")

    assert int((inputs.input_ids == model.config.image_token_index).sum()) == 16
    assert tuple(inputs.pixel_values.shape) == (1, 3, 32, 32)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert tuple(logits.shape) == (1, inputs.input_ids.shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()
    assert image_seq_length(processor) == image_seq_length(model.config) == model.config.image_seq_length == 16


def test_tokenizer_specials_and_bos(tiny_dir):
    tok = load_processor(tiny_dir.model).tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    ids = tok("<|im_start|>user\n<image>\nhi<|im_end|></s>").input_ids
    assert ids[0] == tok.bos_token_id
    for special in ("<image>", "<|im_start|>", "<|im_end|>", "</s>"):
        assert tok.convert_tokens_to_ids(special) in ids
    assert len(tok("<image>", add_special_tokens=False).input_ids) == 1
    # Trained on the task's own words: a whole question is a handful of tokens, not bytes.
    assert len(tok("What colour is the shape?", add_special_tokens=False).input_ids) <= 6


def test_tokenizer_offsets_map_back_to_the_text(tiny_dir):
    tok = load_processor(tiny_dir.model).tokenizer
    special = set(tok.all_special_ids)
    checked = 0
    for record in _records(tiny_dir)[:20]:
        for template in TEMPLATES.values():
            text = template.render(_turns(record)).text
            enc = tok(text, return_offsets_mapping=True)
            covered = [0] * len(text)
            for token_id, (start, end) in zip(enc.input_ids, enc.offset_mapping, strict=True):
                piece = tok.decode([token_id])
                if token_id == tok.bos_token_id and (start, end) == (0, 0):
                    continue
                if token_id in special:
                    assert text[start:end] == piece
                else:
                    # trimmed offsets: the word without its leading space (a lone space maps to nothing)
                    assert text[start:end] == piece.strip(" "), (text, piece, start, end)
                for i in range(start, end):
                    covered[i] += 1
                checked += 1
            assert all(c == 1 for c, ch in zip(covered, text, strict=True) if ch != " "), text
    assert checked > 1000


def test_dataset_is_valid_llava_with_multi_turn_and_text_only(tiny_dir):
    from PIL import Image

    train, val = json.loads(tiny_dir.train.read_text()), json.loads(tiny_dir.val.read_text())
    records = train + val
    assert len(records) == 160 and len(val) == 16
    assert len({r["id"] for r in records}) == 160
    answers = set(COLOURS) | set(SHAPES)
    for r in records:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
        assert all(t["value"] in answers for t in conv[1::2])
        assert all("<image>" not in t["value"] for t in conv[1:])
        if "image" in r:
            assert conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1
            with Image.open(tiny_dir.images / r["image"]) as img:
                assert img.format == "PNG" and all(32 <= side <= 64 for side in img.size)
        else:
            assert "<image>" not in conv[0]["value"]
    assert {r["image"] for r in train if "image" in r}.isdisjoint(r["image"] for r in val if "image" in r)
    assert sorted(p.name for p in tiny_dir.images.iterdir()) == sorted(r["image"] for r in records if "image" in r)
    text_only = sum("image" not in r for r in records)
    multi_turn = sum(len(r["conversations"]) == 4 for r in records)
    assert 5 <= text_only <= 30 and 10 <= multi_turn <= 40
    assert any(Image.open(tiny_dir.images / r["image"]).size[0] != Image.open(tiny_dir.images / r["image"]).size[1]
               for r in records if "image" in r)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic_for_a_seed(tmp_path):
    a, b, c = (build_tiny(tmp_path / name, samples=24, seed=seed) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert "model/model.safetensors" in _digests(tmp_path / "a")
    assert a.train.read_text() != c.train.read_text()
    assert (a.model / "model.safetensors").read_bytes() != (c.model / "model.safetensors").read_bytes()


def test_tiny_cli_json_and_bad_samples(tmp_path, capsys):
    assert main(["tiny", "--out", str(tmp_path / "t"), "--samples", "12", "--seed", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_samples"] + summary["val_samples"] == 12
    assert summary["image_seq_length"] == 16
    assert Path(summary["model"], "model.safetensors").is_file()
    assert main(["tiny", "--out", str(tmp_path / "u"), "--samples", "1"]) == 2
    assert "--samples must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def test_7b_shape_has_llava_1_5_7b_sizes(tiny_dir):
    """Built on the meta device (no memory): the parameter count and image tokens of LLaVA-1.5-7B."""
    import torch
    from transformers import AutoTokenizer

    from llava_cluster.tiny.build import MODEL_SHAPES, build_model, build_processor

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir.model)
    model = build_model(tokenizer, shape=MODEL_SHAPES["7b"], device="meta", dtype="bf16")
    params = sum(p.numel() for p in model.parameters())
    assert 7.0e9 < params < 7.1e9, params  # llava-1.5-7b-hf: 7.06 B
    assert model.config.text_config.vocab_size == 32064 and model.config.image_seq_length == 576
    assert next(model.parameters()).dtype == torch.bfloat16
    assert image_seq_length(build_processor(tokenizer, MODEL_SHAPES["7b"])) == 576


def test_tiny_cli_llava_next_family_has_v1_6_config_fields(tmp_path, capsys):
    assert main(["tiny", "--out", str(tmp_path / "n"), "--samples", "6", "--family", "llava_next", "--json"]) == 0
    out = capsys.readouterr().out  # DeepSpeed's import may log a line to stdout first (no accelerator here)
    assert json.loads(out[out.index("{"):])["family"] == "llava_next"
    config = json.loads((tmp_path / "n" / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "mistral" and config["vision_feature_select_strategy"] == "default"
    assert config["image_grid_pinpoints"] == [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # v1.6's, /336*32
