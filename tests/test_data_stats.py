"""`llava-cluster data stats`: counts, modality mix, image sizes from headers, token percentiles."""

from __future__ import annotations

import json
from pathlib import Path

from hostile_files import make_special_files, no_hang
from PIL import Image

from llava_cluster.cli import main
from llava_cluster.data.stats import percentiles


def turns(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def stats_json(capsys, *args) -> tuple[int, dict]:
    code = main(["data", "stats", *map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_percentiles_nearest_rank():
    assert percentiles(list(range(1, 101))) == {"min": 1, "p50": 50, "p90": 90, "p99": 99, "max": 100,
                                                "mean": 50.5}
    assert percentiles([7]) == {"min": 7, "p50": 7, "p90": 7, "p99": 7, "max": 7, "mean": 7.0}
    assert percentiles([]) == {}


def make_dataset(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    sizes = {"a.png": (100, 50), "b.png": (400, 400), "c.png": (300, 700), "d.png": (2000, 100)}
    for name, size in sizes.items():
        Image.new("RGB", size).save(images / name)
    samples = [
        {"id": "1", "image": "a.png", "conversations": turns("<image>\nq", "a")},
        {"id": "2", "image": "b.png", "conversations": turns("<image>\nq", "a", "q2", "a2")},
        {"id": "3", "image": "c.png", "conversations": turns("<image>\nq", "a", "q2", "a2", "q3", "a3")},
        {"id": "4", "image": "d.png", "conversations": turns("<image>\nq", "a")},
        {"id": "5", "image": "a.png", "conversations": turns("<image>\nsame image again", "a")},
        {"id": "6", "conversations": turns("text only", "a")},
        {"id": "7", "conversations": [{"from": "bot", "value": "malformed"}]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return path, images


def test_counts_turns_and_image_sizes(tmp_path, capsys):
    path, images = make_dataset(tmp_path)
    code, stats = stats_json(capsys, path, "--image-folder", images, "--image-sample", "0")
    assert code == 0
    assert stats["samples"] == 7 and stats["malformed"] == 1
    assert stats["modality"] == {"image": 5, "text_only": 1}
    assert stats["distinct_images"] == 4
    assert stats["turns"]["total"] == 2 + 4 + 6 + 2 + 2 + 2
    assert stats["turns"]["per_sample"]["max"] == 6 and stats["turns"]["per_sample"]["p50"] == 2
    img = stats["images"]
    assert img["method"] == "all 4 distinct images" and img["measured"] == 4
    assert img["width"]["max"] == 2000 and img["height"]["max"] == 700 and img["width"]["min"] == 100
    assert img["longest_side"] == {"<=336": 1, "337-672": 1, "673-1344": 1, ">1344": 1}
    assert img["orientation"] == {"landscape": 2, "portrait": 1, "square": 1}
    assert stats["tokens"] is None


def test_image_sample_says_it_is_a_sample(tmp_path, capsys):
    path, images = make_dataset(tmp_path)
    (images / "d.png").write_bytes(b"broken")
    code, stats = stats_json(capsys, path, "--image-folder", images, "--image-sample", "2")
    assert code == 0
    assert stats["images"]["method"].startswith("random sample of 2 distinct images")
    assert stats["images"]["measured"] + stats["images"]["unreadable"] == 2


def test_token_percentiles_with_the_tiny_model(tiny_dir, capsys):
    from llava_cluster.model.load import image_seq_length, load_processor

    n = image_seq_length(load_processor(tiny_dir.model))
    code, stats = stats_json(capsys, tiny_dir.train, "--model", tiny_dir.model)
    assert code == 0
    tokens = stats["tokens"]
    assert tokens["image_seq_length"] == n and tokens["template"] == "vicuna_v1"
    assert tokens["image"]["min"] > n  # an image sample is at least its image tokens plus text
    assert tokens["text_only"]["max"] < tokens["image"]["max"]
    everything = tokens["all"]
    assert everything["min"] <= everything["p50"] <= everything["p90"] <= everything["p99"] <= everything["max"]
    assert tokens["over"]["512"] == 0


def test_human_output_and_bad_input(tmp_path, capsys):
    path, images = make_dataset(tmp_path)
    assert main(["data", "stats", str(path), "--image-folder", str(images)]) == 0
    out = capsys.readouterr().out
    assert "image width (px)" in out and "malformed" in out and "pass --model" in out
    assert main(["data", "stats", str(tmp_path / "absent.json")]) == 2
    assert "data file not found" in capsys.readouterr().err


def test_images_outside_the_folder_or_special_are_unreadable_never_measured(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (50, 60)).save(images / "ok.png")
    Image.new("RGB", (999, 999)).save(tmp_path / "outside.png")  # readable, but not ours to open
    special = sorted(make_special_files(images))
    names = ["ok.png", "../outside.png", str(tmp_path / "outside.png"), *special]
    samples = [{"id": str(i), "image": name, "conversations": turns("<image>\nq", "a")} for i, name in enumerate(names)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    with no_hang():
        code, stats = stats_json(capsys, path, "--image-folder", images, "--image-sample", "0")
    assert code == 0
    img = stats["images"]
    assert (img["measured"], img["unreadable"]) == (1, len(names) - 1)
    assert img["width"]["max"] == 50 and img["height"]["max"] == 60


def test_hostile_records_are_malformed_not_a_crash(tiny_dir, tmp_path, capsys):
    good = {"id": "g", "conversations": turns("hello", "a")}
    lines = [json.dumps(good), json.dumps({"id": "s", "conversations": turns("bad \ud800", "a")}),
             '{"id": "n", "x": ' + "1" * 5000 + "}", "[" * 5000 + "]" * 5000]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, stats = stats_json(capsys, path, "--model", tiny_dir.model)
    assert code == 0 and (stats["samples"], stats["malformed"]) == (4, 3)
    assert stats["tokens"]["all"]["max"] > 0


def test_llava_next_token_lengths_differ_by_image_size(tiny_next_dir, tmp_path, capsys):
    from llava_cluster.model.family import FAMILIES, ImageTokens
    from llava_cluster.model.load import load_processor

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "square.png")
    Image.new("RGB", (50, 40)).save(folder / "wide.png")
    samples = [{"id": name, "image": f"{name}.png", "conversations": turns("<image>\nColour?", "red")}
               for name in ("square", "wide")]
    (tmp_path / "d.json").write_text(json.dumps(samples))
    code, stats = stats_json(capsys, tmp_path / "d.json", "--image-folder", folder, "--model", tiny_next_dir.model)
    counter = ImageTokens(load_processor(tiny_next_dir.model), FAMILIES["llava_next"])
    image = stats["tokens"]["image"]
    assert code == 0 and stats["tokens"]["template"] == "mistral_instruct"
    assert image["max"] - image["min"] == counter.for_size(50, 40) - counter.for_size(32, 32) > 0
