"""`llava-cluster data check`: every defect class is reported with its sample id and field, on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_files import make_special_files, no_hang
from PIL import Image

from llava_cluster.cli import main
from llava_cluster.data import reader as reader_module
from llava_cluster.data.reader import SampleReader
from llava_cluster.data.schema import DEFECT_KINDS


def turns(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def good(sid: str, image: str | None = "red.png") -> dict:
    sample = {"id": sid, "conversations": turns("<image>\nWhat colour?" if image else "Say hi", "red")}
    if image:
        sample["image"] = image
    return sample


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(images / "red.png")
    Image.new("RGB", (30, 40), (0, 0, 200)).save(images / "blue.png")
    return images


def write(tmp_path: Path, samples: list, name: str = "data.json") -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    else:
        path.write_text(json.dumps(samples, indent=2))
    return path


def run_check(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["data", "check", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def check_json(capsys, path: Path, folder: Path | None, *extra: str) -> tuple[int, dict]:
    args = [path, *(["--image-folder", folder] if folder else []), "--json", *extra]
    code, out, _ = run_check(capsys, *args)
    return code, json.loads(out)


def bad(sid: str, **changes) -> dict:
    sample = good(sid)
    for key, value in changes.items():
        if value is None:
            sample.pop(key, None)
        else:
            sample[key] = value
    return sample


# (defect kind, the bad sample, its id as reported, the field named); each is a real file with one
# clean sample before the bad one so the index is 1.
CASES = [
    ("wrong_type", bad("v", conversations=[{"from": "human", "value": ["<image>"]}, {"from": "gpt", "value": "x"}]),
     "v", "conversations[0].value"),
    ("wrong_type", bad(7), "7", "id"),
    ("wrong_type", bad("imgs", image=["red.png", "blue.png"]), "imgs", "image"),
    ("missing_id", bad("", id=None), None, "id"),
    ("missing_conversations", bad("noconv", conversations=None), "noconv", "conversations"),
    ("missing_conversations", bad("emptyconv", conversations=[]), "emptyconv", "conversations"),
    ("unknown_role", bad("role", conversations=[{"from": "human", "value": "<image>\nq"},
                                                  {"from": "assistant", "value": "a"}]),
     "role", "conversations[1].from"),
    ("first_not_human", bad("first", conversations=[{"from": "gpt", "value": "<image>\nhello"},
                                                     {"from": "human", "value": "hi"}]),
     "first", "conversations[0].from"),
    ("not_alternating", bad("alt", conversations=turns("<image>\nq", "a") + [{"from": "gpt", "value": "again"}]),
     "alt", "conversations[2].from"),
    ("unanswered_turn", bad("open", conversations=turns("<image>\nq", "a", "and?")), "open", "conversations[2]"),
    ("empty_value", bad("blank", conversations=turns("<image>\nq", "   ")), "blank", "conversations[1].value"),
    ("image_token_missing", bad("notoken", conversations=turns("What colour?", "red")), "notoken", "conversations"),
    ("image_token_unexpected", bad("extra", image=None), "extra", "conversations[0].value"),
    ("image_token_repeated", bad("twice", conversations=turns("<image>\nq <image>", "a")),
     "twice", "conversations[0].value"),
    ("image_token_misplaced", bad("late", conversations=turns("q", "a", "<image>\nand this?", "b")),
     "late", "conversations[2].value"),
    ("image_path_unsafe", bad("abs", image="/etc/passwd"), "abs", "image"),
    ("image_path_unsafe", bad("dots", image="../images/red.png"), "dots", "image"),
    ("image_missing", bad("gone", image="nope/missing.png"), "gone", "image"),
]


@pytest.mark.parametrize("kind, sample, sid, field", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_each_structural_defect_is_reported_with_id_and_field(tmp_path, folder, capsys, kind, sample, sid, field):
    path = write(tmp_path, [good("clean-0"), sample])
    code, report = check_json(capsys, path, folder)
    assert code == 1
    hits = [d for d in report["defects"] if d["kind"] == kind]
    assert hits, report["defects"]
    assert (hits[0]["index"], hits[0]["id"], hits[0]["field"]) == (1, sid, field)
    assert report["counts"][kind] == len(hits)
    assert all(d["index"] == 1 for d in report["defects"]), "the clean sample must not be blamed"

    code, text, _ = run_check(capsys, path, "--image-folder", folder)
    assert code == 1
    line = next(ln for ln in text.splitlines() if ln.startswith(kind))
    assert field in line and "sample 1" in line
    if sid:
        assert f"id '{sid}'" in line


def test_duplicate_id_names_both_samples(tmp_path, folder, capsys):
    path = write(tmp_path, [good("a"), good("b"), good("a", image=None)])
    code, report = check_json(capsys, path, folder)
    assert code == 1
    [dup] = report["defects"]
    assert (dup["kind"], dup["index"], dup["id"], dup["field"]) == ("duplicate_id", 2, "a", "id")
    assert "sample 0" in dup["message"]


def test_invalid_json_line_is_reported_with_line_and_column_and_jsonl_goes_on(tmp_path, folder, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good("a")) + "\n" + '{"id": "b", "conversations": [}\n' + "\n"
                    + json.dumps(good("c", image=None)) + "\n" + json.dumps(bad("d", image="gone.png")) + "\n")
    code, report = check_json(capsys, path, folder)
    assert code == 1
    broken = [d for d in report["defects"] if d["kind"] == "invalid_json"]
    assert len(broken) == 1 and broken[0]["index"] == 1
    assert broken[0]["message"].startswith("line 2 column 31:")
    assert report["samples"] == 4  # reading went on after the broken line
    assert [(d["kind"], d["id"]) for d in report["defects"] if d["kind"] != "invalid_json"] == [("image_missing", "d")]


def test_invalid_json_in_a_list_stops_with_line_and_column(tmp_path, folder, capsys):
    text = json.dumps([good("a"), good("b"), good("c")], indent=2)
    broken = text.replace('"id": "b",', '"id": "b",,', 1)
    path = tmp_path / "data.json"
    path.write_text(broken)
    with pytest.raises(json.JSONDecodeError) as want:
        json.loads(broken)
    code, report = check_json(capsys, path, folder)
    assert code == 1 and report["stopped_early"] is True
    [defect] = report["defects"]
    assert defect["kind"] == "invalid_json" and defect["index"] == 1
    assert defect["message"].startswith(f"line {want.value.lineno} column {want.value.colno}:")


def test_not_an_object(tmp_path, folder, capsys):
    code, report = check_json(capsys, write(tmp_path, [good("a"), "just text"]), folder)
    assert code == 1
    assert [(d["kind"], d["index"]) for d in report["defects"]] == [("not_an_object", 1)]


def test_empty_image_file(tmp_path, folder, capsys):
    (folder / "empty.png").write_bytes(b"")
    code, report = check_json(capsys, write(tmp_path, [good("a"), good("e", image="empty.png")]), folder)
    assert code == 1
    assert [(d["kind"], d["id"], d["field"]) for d in report["defects"]] == [("image_empty", "e", "image")]


def test_unreadable_image_not_a_file(tmp_path, folder, capsys):
    (folder / "dir.png").mkdir()
    code, report = check_json(capsys, write(tmp_path, [good("a"), good("d", image="dir.png")]), folder)
    assert code == 1
    assert [(d["kind"], d["id"], d["field"]) for d in report["defects"]] == [("image_unreadable", "d", "image")]


def test_corrupt_images_garbage_and_truncated(tmp_path, folder, capsys):
    (folder / "garbage.jpg").write_bytes(b"this is not an image at all")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) - 20])  # header intact: open() and size still work
    samples = [good("a"), good("g", image="garbage.jpg"), good("t", image="cut.png"), good("t2", image="cut.png")]
    code, report = check_json(capsys, write(tmp_path, samples), folder)
    assert code == 1
    assert [(d["kind"], d["id"]) for d in report["defects"]] == [
        ("image_corrupt", "g"), ("image_corrupt", "t"), ("image_corrupt", "t2")]
    assert report["images_checked"] == 3  # red.png, garbage.jpg, cut.png: each opened once


def test_symlink_out_of_the_image_folder_is_unsafe(tmp_path, folder, capsys):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, folder / "link.png")
    code, report = check_json(capsys, write(tmp_path, [good("a"), good("s", image="link.png")]), folder)
    assert code == 1
    [defect] = report["defects"]
    assert (defect["kind"], defect["id"]) == ("image_path_unsafe", "s")
    assert "outside the image folder" in defect["message"]


def test_clean_dataset_exits_0_and_reports_the_modality_mix(tmp_path, folder, capsys):
    samples = [good("a"), good("b", image="blue.png"), good("c", image=None),
               {"id": "d", "image": "sub/../red.png", "conversations": turns("<image>\nq", "a", "more?", "yes")}]
    path = write(tmp_path, samples, "data.jsonl")
    code, report = check_json(capsys, path, folder)
    assert code == 0 and report["ok"] is True and report["defects"] == []
    assert report["samples"] == 4
    assert report["modality"] == {"image": 3, "text_only": 1}
    assert report["turns"] == 10
    assert report["images_checked"] == 3  # distinct path strings; sub/../red.png stays inside the folder
    code, text, _ = run_check(capsys, path, "--image-folder", folder)
    assert code == 0 and "clean" in text and "text-only" in text


def test_print_cap_per_kind_but_json_has_all(tmp_path, folder, capsys):
    samples = [good(f"s{i}", image=f"missing-{i}.png") for i in range(7)]
    path = write(tmp_path, samples)
    code, text, _ = run_check(capsys, path, "--image-folder", folder, "--show", "3")
    assert code == 1
    assert sum(ln.startswith("image_missing") for ln in text.splitlines()) == 3
    assert "… and 4 more image_missing" in text
    code, report = check_json(capsys, path, folder)
    assert len(report["defects"]) == 7


def test_without_image_folder_files_are_not_opened(tmp_path, capsys):
    path = write(tmp_path, [good("a", image="nowhere.png")])
    code, report = check_json(capsys, path, None)
    assert code == 0 and report["images_checked"] == 0 and report["image_folder"] is None


@pytest.mark.parametrize("content, name, message", [
    (None, "absent.json", "data file not found"),
    ("", "empty.json", "is empty"),
    ("image,question,answer\na.png,q,a\n", "data.json", "not JSON"),
    ('{"data": []}', "data.json", "starts with a JSON object"),
    ('[{"id": "a"}]', "data.jsonl", "rename it to .json"),
    ("id,question\n", "data.jsonl", "not JSON Lines"),
])
def test_unusable_input_exits_2_with_one_message(tmp_path, capsys, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code, out, err = run_check(capsys, path)
    assert code == 2
    assert message in err and "Traceback" not in err + out
    assert err.count("error:") == 1


def test_missing_image_folder_exits_2(tmp_path, capsys):
    code, _, err = run_check(capsys, write(tmp_path, [good("a")]), "--image-folder", tmp_path / "nope")
    assert code == 2 and "image folder not found" in err


def test_max_length_needs_model(tmp_path, capsys):
    code, _, err = run_check(capsys, write(tmp_path, [good("a")]), "--max-length", "100")
    assert code == 2 and "--max-length needs --model" in err


def test_token_lengths_with_the_tiny_model(tiny_dir, tmp_path, capsys):
    """Too long with rounds to drop -> too_long with the lost tokens; first round too long -> no labels."""
    from llava_cluster.data.encode import encode_sample
    from llava_cluster.data.templates import get_template
    from llava_cluster.model.load import image_seq_length, load_processor

    images = tiny_dir.images
    image = sorted(p.name for p in Path(images).iterdir())[0]
    short = {"id": "short", "image": image, "conversations": turns("<image>\nColour?", "red")}
    multi = {"id": "multi", "image": image,
             "conversations": turns("<image>\nColour?", "red", "Shape? " * 8, "circle " * 8)}
    huge = {"id": "huge", "image": image, "conversations": turns("<image>\n" + "describe " * 60, "red")}
    processor = load_processor(tiny_dir.model)
    n = image_seq_length(processor)
    full = {s["id"]: encode_sample(s, processor.tokenizer, get_template("vicuna_v1"), n, None).full_length
            for s in (short, multi, huge)}
    first_round = encode_sample(short, processor.tokenizer, get_template("vicuna_v1"), n, None).full_length
    limit = max(full["short"], first_round) + 2
    assert full["multi"] > limit and full["huge"] > limit

    path = write(tmp_path, [short, multi, huge])
    code, report = check_json(capsys, path, Path(images), "--model", str(tiny_dir.model),
                              "--max-length", str(limit))
    assert code == 1
    kinds = {d["id"]: d for d in report["defects"]}
    assert set(kinds) == {"multi", "huge"}
    assert kinds["multi"]["kind"] == "too_long"
    kept = encode_sample(multi, processor.tokenizer, get_template("vicuna_v1"), n, limit)
    assert f"drops {kept.lost_tokens} tokens" in kinds["multi"]["message"] and kept.lost_tokens > 0
    assert kinds["huge"]["kind"] == "first_round_too_long"
    assert report["tokens"]["over_limit"] == 2 and report["tokens"]["no_labels"] == 1
    assert report["tokens"]["longest"] == max(full.values())

    code, report = check_json(capsys, path, Path(images), "--model", str(tiny_dir.model),
                              "--max-length", str(max(full.values())))
    assert code == 0 and report["tokens"]["over_limit"] == 0


def test_reader_streams_and_matches_json_load_at_any_chunk_size(tmp_path, monkeypatch):
    samples = [dict(good(f"s{i}"), note="é\"\\\n" * (i % 5), n=i * 1.5e3) for i in range(300)]
    path = write(tmp_path, samples)
    for chunk in (7, 100, 4096):
        monkeypatch.setattr(reader_module, "CHUNK", chunk)
        reader = SampleReader(path)
        records = iter(reader)
        first = next(records)
        assert first.value == samples[0]
        assert reader.bytes_read < reader.size / 10  # the rest of the file is not read yet
        assert [first.value] + [r.value for r in records] == json.loads(path.read_text())


def test_special_files_named_as_images_are_defects_and_never_block(tmp_path, folder, capsys):
    expected = make_special_files(folder)
    samples = [good(name, image=name) for name in expected] + [good("nul", image="red\0.png"), good("ok")]
    for workers in ("1", "3"):
        with no_hang():
            code, report = check_json(capsys, write(tmp_path, samples), folder, "--workers", workers)
        assert code == 1
        found = {d["id"]: d["kind"] for d in report["defects"]}
        assert found == {**expected, "nul": "image_path_unsafe"}
    assert "NUL byte" in next(d["message"] for d in report["defects"] if d["id"] == "nul")


def test_hostile_json_lines_are_named_defects_and_checking_goes_on(tmp_path, folder, capsys):
    lines = ['{"id": "big", "n": ' + "7" * 5000 + "}",
             "[" * 100_000 + "]" * 100_000,
             json.dumps(good("sur", image=None)).replace("Say hi", "Say \\ud800 hi"),
             json.dumps(bad("last", image="gone.png"))]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, report = check_json(capsys, path, folder)
    assert code == 1 and report["samples"] == 4
    got = [(d["index"], d["id"], d["kind"], d["field"]) for d in report["defects"]]
    assert got == [(0, None, "invalid_json", "(json)"), (1, None, "invalid_json", "(json)"),
                   (2, "sur", "invalid_text", "conversations[0].value"), (3, "last", "image_missing", "image")]
    messages = [d["message"] for d in report["defects"]]
    assert "an integer of 5,000 digits" in messages[0] and "nested too deeply" in messages[1]
    assert "lone surrogate \\ud800 at character 4" in messages[2]
    code, out, err = run_check(capsys, path, "--image-folder", folder)  # the rich report prints it too
    assert code == 1 and "invalid_text" in out and "Traceback" not in out + err


def test_hostile_json_list_items_are_named_defects(tmp_path, folder, capsys):
    text = json.dumps([good("a"), {"id": "big", "n": 1}, good("s", image=None), good("d")])
    text = text.replace('"n": 1', '"n": ' + "-" + "9" * 4400).replace("Say hi", "\\udfff")
    path = tmp_path / "data.json"
    path.write_text(text)
    code, report = check_json(capsys, path, folder)
    assert code == 1 and report["samples"] == 4 and not report["stopped_early"]
    assert [(d["index"], d["kind"]) for d in report["defects"]] == [(1, "invalid_json"), (2, "invalid_text")]
    assert report["defects"][0]["message"].startswith("line 1 column ")



@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_a_list_item_nested_too_deeply_is_stepped_over(tmp_path, folder, capsys, monkeypatch, chunk):
    monkeypatch.setattr(reader_module, "CHUNK", chunk)
    nested = "[" * 3000 + '"a]\\"}[", {"k": "]]"}' + "]" * 3000  # brackets inside strings do not count
    text = json.dumps([good("a"), "NEST", bad("b", image="gone.png")], indent=1).replace('"NEST"', nested)
    path = tmp_path / "data.json"
    path.write_text(text)
    code, report = check_json(capsys, path, folder)
    assert code == 1 and not report["stopped_early"] and report["samples"] == 3
    assert [(d["index"], d["kind"]) for d in report["defects"]] == [(1, "invalid_json"), (2, "image_missing")]
    line = text[: text.index(nested)].count("\n") + 1
    assert report["defects"][0]["message"].startswith(f"line {line} column 2: the sample is nested too deeply")

    path.write_text(text[: text.index(nested) + 4000])  # the file ends inside it
    code, report = check_json(capsys, path, folder)
    assert code == 1 and report["stopped_early"] and report["samples"] == 2
    assert report["defects"][-1]["message"].endswith("and the file ends inside it; reading stopped here, "
                                                     "later samples were not checked")


def test_unencodable_text_is_a_defect_and_not_tokenized(tiny_dir, tmp_path, capsys):
    sample = {"id": "s\ud800", "conversations": turns("Say \udc80 hi", "red")}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(sample) + "\n" + json.dumps(good("plain", image=None)) + "\n")
    code, report = check_json(capsys, path, None, "--model", str(tiny_dir.model))
    assert code == 1
    assert [(d["id"], d["kind"], d["field"]) for d in report["defects"]] == [("s\ud800", "invalid_text", "id")]
    assert report["tokens"]["longest"] > 0  # the plain sample was measured


def test_every_kind_is_documented():
    kinds = {c[0] for c in CASES} | {"duplicate_id", "invalid_json", "not_an_object", "image_empty",
                                    "image_unreadable", "image_corrupt", "too_long", "first_round_too_long",
                                    "invalid_text", "image_too_large"}
    assert kinds == set(DEFECT_KINDS)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_cluster.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_subprocess_bad_data_and_unusable_input_never_show_a_traceback(tmp_path, folder):
    path = write(tmp_path, [good("a"), bad("x", image="../../etc/passwd"), "not a sample", good("a")])
    result = _cli("data", "check", str(path), "--image-folder", str(folder))
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "image_path_unsafe" in result.stdout and "id 'x'" in result.stdout

    junk = tmp_path / "junk.json"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n binary")
    result = _cli("data", "check", str(junk))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr and "not JSON" in result.stderr


def test_data_help_imports_no_torch_and_preview_is_wired(tiny_dir, capsys):
    probe = ("import sys\nfrom llava_cluster.cli import main\n"
             "for argv in (['data', '--help'], ['data', 'check', '--help'], ['data', 'preview', '--help']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False False"
    assert "usage: llava-cluster data preview" in result.stdout

    assert main(["data", "preview", str(tiny_dir.train), "--model", str(tiny_dir.model), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["input_ids"]) == len(shown["labels"]) > 0


def test_threaded_image_checks_report_exactly_what_one_thread_does(tmp_path, folder, capsys):
    """--workers N decodes images in threads; the defects, their order and the counts are unchanged."""
    for i in range(60):
        Image.new("RGB", (8 + i, 8), (i, 0, 0)).save(folder / f"ok{i}.png")
    for i in range(0, 60, 7):
        (folder / f"ok{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt every 7th
    samples = []
    for i in range(300):
        sample = good(f"s{i}", image=f"ok{i % 60}.png" if i % 11 else f"missing{i}.png")
        if i % 13 == 0:
            sample["conversations"][1]["value"] = ""  # a structural defect beside the image ones
        samples.append(sample)
    path = write(tmp_path, samples)
    code1, one = check_json(capsys, path, folder, "--workers", "1")
    code4, four = check_json(capsys, path, folder, "--workers", "4")
    assert code1 == code4 == 1
    assert one["defects"] == four["defects"]
    kinds = {d["kind"] for d in one["defects"]}
    assert {"image_corrupt", "image_missing", "empty_value"} <= kinds
    assert [d["index"] for d in four["defects"]] == sorted(d["index"] for d in four["defects"])


def test_workers_must_be_positive(tmp_path, folder, capsys):
    code, _, err = run_check(capsys, write(tmp_path, [good("a")]), "--image-folder", folder, "--workers", "0")
    assert code == 2 and "--workers must be at least 1" in err


def test_llava_next_token_lengths_count_each_image_from_its_header(tiny_next_dir, tmp_path, capsys):
    """Any-resolution: the same text with a wide and a square image has different lengths; the limit
    between them flags only the wide one, and the message gives that image's own count."""
    from llava_cluster.data.templates import get_template
    from llava_cluster.model.family import FAMILIES, ImageTokens
    from llava_cluster.model.load import load_processor

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "square.png")
    Image.new("RGB", (50, 40)).save(folder / "wide.png")
    samples = [{"id": name, "image": f"{name}.png", "conversations": turns("<image>\nColour?", "red")}
               for name in ("square", "wide")]
    processor = load_processor(tiny_next_dir.model)
    counter = ImageTokens(processor, FAMILIES["llava_next"])
    square, wide = counter.for_size(32, 32), counter.for_size(50, 40)
    assert wide > square
    text = len(processor.tokenizer(get_template("mistral_instruct").render(
        [("user", "<image>\nColour?"), ("assistant", "red")]).text)["input_ids"]) - 1
    code, report = check_json(capsys, write(tmp_path, samples), folder, "--model", str(tiny_next_dir.model),
                              "--max-length", str(text + square))
    assert code == 1
    flagged = [d for d in report["defects"] if d["kind"] in ("too_long", "first_round_too_long")]
    assert [d["id"] for d in flagged] == ["wide"]
    assert f"{text + wide} tokens (image = {wide})" in flagged[0]["message"]
    assert report["tokens"]["template"] == "mistral_instruct"
