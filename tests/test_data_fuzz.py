"""Seeded fuzz of the data tools: thousands of hostile records and every special file as an image.

`data check` (with and without --model), `data stats` and `data preview` run in-process through the
CLI entry point. Each call must end (an alarm turns a hang into a failure), exit 0, 1 or 2, and never
raise: a record that breaks a check is a named defect or a clear error, never a traceback.
"""

from __future__ import annotations

import json
import random

import pytest
from hostile_files import make_special_files, no_hang
from PIL import Image

from llava_cluster.cli import main

SEED = 17
RECORDS = 3000
TOKENIZED = 1000  # the runs with --model tokenize the first records only: the tokenizer is the slow part
PREVIEWS = 30

NASTY_TEXT = ["", " ", "\t\n", "<image>", "<image><image>", "[bold red]markup[/]", "[/]", "\x00", "\x1b[2J",
              "\u202eevil", "\ufeff", "😀" * 20, "é" * 300, "x" * 1000, "\\", "%s%n", "{0}", "</s>", "<s>",
              "USER:", "ASSISTANT:", "<|im_end|>", "\r\n\r\n"]
NASTY_PATHS = ["/etc/passwd", "/dev/zero", "../outside.png", "a/../../outside.png", "red.png\x00.txt", "", " ", ".", "..",
               "/", "sub/", "red.png/", "~/red.png", "*", "x" * 5000 + ".png", "a/" * 2000 + "b.png",
               "C:\\red.png", "\\\\server\\share\\red.png", "red.png\n", "file:///etc/passwd", "%2e%2e/red.png"]
NASTY_VALUES = [None, True, 0, -1, 1.5, 1e308, [], {}, [None], {"a": 1}, [[[[[]]]]], "", "x" * 10]
RAW_HOSTILE = ["7" * 5000, "-" + "9" * 4400, "[" * 3000 + "]" * 3000, '"\\ud800"', '"\\udfff\\ud800"',
               '"a\\u0000b"', "1e999999", "-0", "NaN", "Infinity", '{"__proto__": 1}']
SYNTAX_ERRORS = ['{"id": "x",}', '{"id": "x"', "{'id': 'x'}", '{"id": "x"} extra', "{", '{"a": [}', '{"a": "\\x"}']


def _good(rng: random.Random, i: int, images: list[str]) -> dict:
    turns = [{"from": "human" if t % 2 == 0 else "gpt", "value": f"turn {t} of {i}"} for t in range(2 * rng.randint(1, 3))]
    sample = {"id": f"s{i}", "conversations": turns}
    if rng.random() < 0.7:
        sample["image"] = rng.choice(images)
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
    return sample


def _mutate(rng: random.Random, sample: dict, special: list[str]) -> dict:
    """One to three random hostile changes to a well-formed sample."""
    for _ in range(rng.randint(1, 3)):
        turns = sample.get("conversations")
        choice = rng.randrange(10)
        if choice == 0:
            sample["id"] = rng.choice(NASTY_VALUES + NASTY_TEXT)
        elif choice == 1:
            sample["image"] = rng.choice(NASTY_PATHS + NASTY_VALUES)
        elif choice == 2:
            sample["image"] = rng.choice(special)
        elif choice == 3:
            sample["conversations"] = rng.choice(NASTY_VALUES)
        elif choice == 4 and isinstance(turns, list) and turns:
            turn = rng.choice(turns)
            if isinstance(turn, dict):
                turn[rng.choice(["from", "value"])] = rng.choice(NASTY_VALUES + NASTY_TEXT)
        elif choice == 5 and isinstance(turns, list):
            turns.insert(rng.randrange(len(turns) + 1), rng.choice(NASTY_VALUES))
        elif choice == 6 and isinstance(turns, list) and turns and isinstance(turns[0], dict):
            turns[0]["value"] = str(turns[0].get("value")) + rng.choice(NASTY_TEXT)
        elif choice == 7 and isinstance(turns, list):
            sample["conversations"] = turns * rng.choice([0, 2, 30])
        elif choice == 8:
            sample[rng.choice(["extra", "", "id ", "IMAGE"])] = rng.choice(NASTY_VALUES + NASTY_TEXT)
        else:
            sample.pop(rng.choice(["id", "image", "conversations"]), None)
    return sample


def _raw(rng: random.Random, sample: dict, lines: bool) -> str:
    """The sample as JSON, sometimes with a hostile literal spliced in where a value goes."""
    text = json.dumps(sample)
    roll = rng.random()
    if roll < 0.15 and text != "{}":
        hostile = rng.choice(RAW_HOSTILE)
        key = rng.choice(["id", "image", "conversations", "extra"])
        text = "{" + json.dumps(key) + ": " + hostile + ", " + text[1:]
    elif roll < 0.2 and lines:
        text = rng.choice(SYNTAX_ERRORS)
    elif roll < 0.22 and lines:
        text = text[: rng.randrange(1, len(text))]  # cut short
    return text


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """(folder, data.jsonl, data.json, head.jsonl): the same seeded hostile records in both layouts, and
    the first TOKENIZED of them for the runs with --model."""
    root = tmp_path_factory.mktemp("fuzz")
    folder = root / "images"
    (folder / "sub").mkdir(parents=True)
    for name, colour in (("red.png", (200, 0, 0)), ("sub/blue.png", (0, 0, 200))):
        Image.new("RGB", (24, 16), colour).save(folder / name)
    (folder / "cut.png").write_bytes((folder / "red.png").read_bytes()[:-12])
    (folder / "junk.jpg").write_bytes(b"\xff\xd8\xff not really")
    special = sorted(make_special_files(folder))
    rng = random.Random(SEED)
    images = ["red.png", "sub/blue.png", "sub/../red.png"]
    samples = [_good(rng, i, images) for i in range(RECORDS)]
    samples = [_mutate(rng, s, special + ["cut.png", "junk.jpg"]) if rng.random() < 0.8 else s for s in samples]
    jsonl = root / "data.jsonl"
    lines = [_raw(rng, s, lines=True) for s in samples]
    jsonl.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n")
    head = root / "head.jsonl"
    head.write_text("\n".join(lines[:TOKENIZED]) + "\n")
    listed = root / "data.json"
    listed.write_text("[" + ",\n".join(_raw(rng, s, lines=False) for s in samples) + "]")
    return folder, jsonl, listed, head


def run(capsys, *argv) -> tuple[int, str]:
    """One CLI call that must end, exit 0/1/2 and raise nothing; returns (code, stdout)."""
    argv = [str(a) for a in argv]
    with no_hang(120):
        code = main(argv)
    out = capsys.readouterr()
    assert code in (0, 1, 2), (argv, code, out.err[-2000:])
    assert "Traceback" not in out.out + out.err, argv
    return code, out.out


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_check_reports_every_hostile_record_and_never_crashes(fuzz, capsys, layout):
    folder, jsonl, listed, _ = fuzz
    data = jsonl if layout == "jsonl" else listed
    code, out = run(capsys, "data", "check", data, "--image-folder", folder, "--json", "--workers", "2")
    report = json.loads(out)
    assert code == 1 and not report["stopped_early"]
    assert report["samples"] == RECORDS + (layout == "jsonl")  # + the line that is not UTF-8
    assert 0.7 * RECORDS < report["defective_samples"] < RECORDS
    assert {"invalid_text", "image_path_unsafe", "image_too_large", "image_unreadable"} <= set(report["counts"])
    run(capsys, "data", "check", data, "--image-folder", folder, "--show", "3")  # the rich report prints too


def test_check_with_the_model_tokenizes_only_what_can_be(fuzz, tiny_dir, capsys):
    folder, _, _, head = fuzz
    code, out = run(capsys, "data", "check", head, "--image-folder", folder, "--model", tiny_dir.model, "--json")
    assert code == 1 and json.loads(out)["tokens"]["longest"] > 0


def test_stats_measures_the_sound_records_only(fuzz, tiny_dir, capsys):
    folder, jsonl, listed, head = fuzz
    for data in (jsonl, listed):
        code, out = run(capsys, "data", "stats", data, "--image-folder", folder, "--image-sample", "0", "--json")
        stats = json.loads(out)
        assert code == 0 and 0 < stats["malformed"] < stats["samples"]
        assert stats["images"]["measured"] >= 2  # red.png and sub/blue.png; every special file is unreadable
    code, out = run(capsys, "data", "stats", head, "--image-folder", folder, "--model", tiny_dir.model)
    assert code == 0 and "tokens (vicuna_v1" in out


def test_preview_of_any_record_is_a_view_or_a_clear_error(fuzz, tiny_dir, capsys):
    _, jsonl, _, _ = fuzz
    indices = random.Random(SEED).sample(range(RECORDS), PREVIEWS)
    codes = [run(capsys, "data", "preview", jsonl, "--model", tiny_dir.model, "--index", i, "--max-length", 64)[0]
             for i in indices]
    assert 0 in codes and 2 in codes
    run(capsys, "data", "preview", jsonl, "--model", tiny_dir.model, "--index", RECORDS, "--json")  # not UTF-8
