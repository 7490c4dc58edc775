"""`llava-cluster data preview`: JSON equals what training encodes; rich view highlights the replies."""

from __future__ import annotations

import json

import pytest

from llava_cluster.cli import main
from llava_cluster.data.encode import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from llava_cluster.model.load import load_processor

    return load_processor(tiny_dir.model).tokenizer


def _multi_turn_index(tiny_dir) -> int:
    records = json.loads(tiny_dir.train.read_text())
    return next(k for k, r in enumerate(records) if r.get("image") and len(r["conversations"]) == 4)


def test_json_is_exactly_what_training_encodes(tiny_dir, tokenizer, capsys):
    from llava_cluster.data.dataset import LazySupervisedDataset
    from llava_cluster.data.templates import TEMPLATES
    from llava_cluster.model.load import load_processor

    index = _multi_turn_index(tiny_dir)
    rc = main(["data", "preview", str(tiny_dir.train), "--model", str(tiny_dir.model), "--index", str(index),
               "--template", "chatml", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    record = json.loads(tiny_dir.train.read_text())[index]
    assert out["id"] == record["id"]
    assert out["text"].startswith("<|im_start|>system\n") and "<image>\n" in out["text"]
    ds = LazySupervisedDataset(tiny_dir.train, tiny_dir.images, load_processor(tiny_dir.model),
                               TEMPLATES["chatml"], 2048)
    item = ds[index]
    assert out["input_ids"] == item["input_ids"].tolist() and out["labels"] == item["labels"].tolist()
    supervised = [t for t, label in zip(out["input_ids"], out["labels"], strict=True) if label != IGNORE_INDEX]
    replies = [t["value"] for t in record["conversations"][1::2]]
    assert tokenizer.decode(supervised) == "<|im_end|>".join(replies) + "<|im_end|>"


def test_rich_view_shows_image_run_replies_and_truncation(tiny_dir, capsys):
    index = _multi_turn_index(tiny_dir)
    record = json.loads(tiny_dir.train.read_text())[index]
    rc = main(["data", "preview", str(tiny_dir.train), "--model", str(tiny_dir.model), "--index", str(index)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "<image>×16" in out and f"sample {record['id']}" in out
    assert all(t["value"] in out for t in record["conversations"][1::2])  # the replies
    assert "truncated" not in out

    rc = main(["data", "preview", str(tiny_dir.train), "--model", str(tiny_dir.model), "--index", str(index),
               "--max-length", "20"])
    out = capsys.readouterr().out
    assert rc == 0 and "truncated at --max-length 20" in out and "trains nothing" in out


@pytest.mark.parametrize("extra, message", [
    (["--index", "100000"], "--index 100000 is out of range"),
    (["--index", "-1"], "--index must be >= 0"),
])
def test_bad_index_is_a_clear_error(tiny_dir, capsys, extra, message):
    rc = main(["data", "preview", str(tiny_dir.train), "--model", str(tiny_dir.model), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_missing_model_dir_is_a_clear_error(tiny_dir, tmp_path, capsys):
    rc = main(["data", "preview", str(tiny_dir.train), "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err


@pytest.mark.parametrize("line, message", [
    ('{"id": "s", "conversations": [{"from": "human", "value": "hi \\ud800"}, {"from": "gpt", "value": "a"}]}',
     r"sample #0 has bad text in conversations[0].value: a lone surrogate \ud800"),
    ('{"id": "n", "x": ' + "1" * 5000 + "}", "sample #0 is not valid JSON: line 1: an integer of 5,000 digits"),
    ('{"x": ' + "[" * 5000 + "]" * 5000 + "}", "sample #0 is not valid JSON: line 1: the sample is nested too deeply"),
])
def test_hostile_records_are_a_clear_error(tiny_dir, tmp_path, capsys, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n")
    rc = main(["data", "preview", str(path), "--model", str(tiny_dir.model)])
    err = capsys.readouterr().err
    assert rc == 2 and message in " ".join(err.split()) and "Traceback" not in err


def test_a_sample_that_cannot_be_encoded_is_a_clear_error(tiny_dir, tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"id": "h", "conversations": [{"from": ["human"], "value": "hi"},
                                                             {"from": "gpt", "value": "a"}]}) + "\n")
    rc = main(["data", "preview", str(path), "--model", str(tiny_dir.model)])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "sample #0 cannot be encoded: wrong_type at conversations[0].from" in err


def test_llava_next_preview_counts_the_image_from_its_size_with_the_family_template(tiny_next_dir, capsys):
    """Default template of a v1.6-Mistral base is `[INST]`; the image run is the dataset's per-image count."""
    from llava_cluster.data.dataset import LazySupervisedDataset
    from llava_cluster.data.templates import TEMPLATES
    from llava_cluster.model.load import load_processor

    records = json.loads(tiny_next_dir.train.read_text())
    wide = next(k for k, r in enumerate(records) if r.get("image"))  # re-saved at 32x32 by the fixture
    tall = [k for k, r in enumerate(records) if r.get("image")][2]  # 20x96
    ds = LazySupervisedDataset(tiny_next_dir.train, tiny_next_dir.images, load_processor(tiny_next_dir.model),
                               TEMPLATES["mistral_instruct"], 2048)
    for index in (wide, tall):
        assert main(["data", "preview", str(tiny_next_dir.train), "--model", str(tiny_next_dir.model),
                     "--image-folder", str(tiny_next_dir.images), "--index", str(index), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["template"] == "mistral_instruct" and out["text"].startswith("[INST] <image>\n")
        assert out["input_ids"] == ds[index]["input_ids"].tolist()
    assert ds.image_counts[wide] != ds.image_counts[tall]
