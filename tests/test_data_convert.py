"""`llava-cluster data convert`: CSV / QA rows / chat messages -> LLaVA JSON with stable ids."""

from __future__ import annotations

import json
from pathlib import Path

from llava_cluster.cli import main


def convert(capsys, src: Path, fmt: str, out: Path, *extra: str) -> tuple[int, dict]:
    code = main(["data", "convert", str(src), "--format", fmt, "--out", str(out), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


CSV = """image,question,answer,source
cat.png,What animal is this?,A cat.,web
,Say hello,Hello!,chat
dog.png,What animal is this?,A dog.,web
cat.png,What animal is this?,A cat.,web
"""


def test_csv_rows_become_llava_samples(tmp_path, capsys):
    src = tmp_path / "qa.csv"
    src.write_text(CSV)
    out = tmp_path / "train.json"
    code, result = convert(capsys, src, "csv", out)
    assert code == 0 and result["written"] == 4 and result["with_image"] == 3 and result["text_only"] == 1
    assert result["notes"] == ["ignored column(s): source"]
    samples = json.loads(out.read_text())
    assert samples[0]["image"] == "cat.png"
    assert samples[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat animal is this?"},
                                           {"from": "gpt", "value": "A cat."}]
    assert "image" not in samples[1] and samples[1]["conversations"][0]["value"] == "Say hello"
    ids = [s["id"] for s in samples]
    assert len(set(ids)) == 4 and ids[3] == ids[0] + "-2"  # identical rows: same hash, numbered

    again = tmp_path / "again.json"
    convert(capsys, src, "csv", again)
    assert [s["id"] for s in json.loads(again.read_text())] == ids  # stable across runs
    assert main(["data", "check", str(out)]) == 0
    capsys.readouterr()


def test_given_ids_are_kept_and_duplicates_are_bad_rows(tmp_path, capsys):
    src = tmp_path / "qa.csv"
    src.write_text("id,image,question,answer\nq1,a.png,Q?,A\nq2,,Q2?,A2\nq1,b.png,Q3?,A3\n")
    out = tmp_path / "train.json"
    code, result = convert(capsys, src, "csv", out)
    assert code == 1 and result["written"] == 0 and not out.exists()
    assert result["problems"] == [{"row": "row 3 (line 4)", "message": "id 'q1' is already used by row 1 (line 2)"}]
    code, result = convert(capsys, src, "csv", out, "--skip-bad")
    assert code == 0 and [s["id"] for s in json.loads(out.read_text())] == ["q1", "q2"]


def test_bad_rows_fail_the_whole_conversion_unless_skip_bad(tmp_path, capsys):
    rows = [
        {"image": "a.png", "question": "Q?", "answer": "A"},
        {"image": "b.png", "question": "", "answer": "A"},
        {"image": None, "question": "Look: <image>", "answer": "A"},
        {"image": "https://example.com/x.png", "question": "Q", "answer": "A"},
        ["not", "an", "object"],
        {"image": "c.png", "question": "Q <image> and <image>", "answer": "A"},
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "train.json"
    out.write_text("previous content")
    code, result = convert(capsys, src, "jsonl", out)
    assert code == 1 and out.read_text() == "previous content"
    problems = {p["row"]: p["message"] for p in result["problems"]}
    assert problems == {
        "row 2": "question is missing or empty",
        "row 3": "text contains <image> but the row has no image",
        "row 4": "image: remote image 'https://example.com/x.png'; download it under the image folder first",
        "row 5": "expected an object, got list",
        "row 6": "text contains <image> 2 times; a sample carries one image",
    }
    code, result = convert(capsys, src, "jsonl", out, "--skip-bad")
    assert code == 0 and result["written"] == 1 and len(result["problems"]) == 5
    assert [s["image"] for s in json.loads(out.read_text())] == ["a.png"]


def test_messages_records(tmp_path, capsys):
    records = [
        {"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "What is shown?"}, {"type": "image", "path": "a.png"}]},
            {"role": "assistant", "content": "A red square."},
        ]},
        {"id": 42, "images": ["b.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."},
        ]},
        {"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file://c.png"}}]},
            {"role": "assistant", "content": "A caption."},
        ]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    src = tmp_path / "chat.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "train.jsonl"
    code, result = convert(capsys, src, "messages", out)
    assert code == 0 and result["written"] == 4
    assert result["notes"] == ["dropped 1 system message(s): the training template brings its own"]
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert samples[0]["image"] == "a.png"
    assert samples[0]["conversations"][0]["value"] == "<image>\nWhat is shown?"
    assert samples[1]["id"] == "42" and samples[1]["image"] == "b.png"
    assert [t["from"] for t in samples[1]["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert samples[1]["conversations"][2]["value"] == "Sure?"
    assert samples[2]["image"] == "c.png" and samples[2]["conversations"][0]["value"] == "<image>"
    assert "image" not in samples[3]
    assert main(["data", "check", str(out)]) == 0
    capsys.readouterr()


def test_messages_problems(tmp_path, capsys):
    records = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]},
        {"images": ["a.png", "b.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "diff?"}]},
            {"role": "assistant", "content": "none"}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}]},
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, result = convert(capsys, src, "messages", tmp_path / "out.json")
    assert code == 1
    assert [p["message"] for p in result["problems"]] == [
        "messages[1].role: unsupported role 'tool' (user, assistant, system)",
        "turn 1 is from 'human' where 'gpt' was expected (human first, alternating)",
        "2 images; a LLaVA sample carries one",
        "1 image placeholder(s) but 0 entries in `images`",
        "the last turn is a question without an answer",
    ]


def test_unusable_sources_exit_2(tmp_path, capsys):
    src = tmp_path / "qa.csv"
    src.write_text("img,q,a\nx,y,z\n")
    assert main(["data", "convert", str(src), "--format", "csv", "--out", str(tmp_path / "o.json")]) == 2
    assert "missing image, question, answer" in capsys.readouterr().err
    assert main(["data", "convert", str(tmp_path / "nope.csv"), "--format", "csv", "--out", "o.json"]) == 2
    assert "source file not found" in capsys.readouterr().err


def test_hostile_rows_are_bad_rows_not_a_crash(tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"image": "a.png", "question": "Q \ud800?", "answer": "A"}) + "\n"
                   + '{"image": "a.png", "question": "Q", "answer": "A", "n": ' + "1" * 5000 + "}\n"
                   + json.dumps({"image": "a.png", "question": "Q?", "answer": "A"}) + "\n")
    code, result = convert(capsys, src, "jsonl", tmp_path / "train.json", "--skip-bad")
    assert code == 0 and result["written"] == 1
    problems = {p["row"]: p["message"] for p in result["problems"]}
    assert problems["row 1"].startswith("question: a lone surrogate \\ud800 at character 2")
    assert problems["row 2"] == "invalid JSON at line 2: an integer of 5,000 digits; at most 4,300 can be read"
