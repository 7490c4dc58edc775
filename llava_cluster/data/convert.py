"""`data convert`: question/answer rows and OpenAI/HF chat records → LLaVA JSON.

Ids are stable: a given id is kept, otherwise the id is a hash of the converted sample, so converting
the same source twice gives the same ids (and a later `data check` can point at the same sample).
All-or-nothing by default: a bad row fails the conversion and nothing is written; `--skip-bad`
writes the good rows and still lists the bad ones.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llava_cluster.data.reader import SampleReader
from llava_cluster.data.templates import IMAGE_TOKEN
from llava_cluster.errors import UserError
from llava_cluster.rundir import atomic_write_text

FORMATS = ("csv", "jsonl", "messages")
QA_FIELDS = ("image", "question", "answer")
ROLE_MAP = {"user": "human", "assistant": "gpt"}


class BadRow(Exception):
    """One row cannot be converted; the message names the field."""


@dataclass
class Problem:
    row: str  # "row 3 (line 4)" for CSV, "row 3" for JSON rows
    message: str


@dataclass
class ConvertResult:
    src: str
    out: str
    format: str
    rows: int = 0
    written: int = 0  # 0 when problems stopped the write
    with_image: int = 0
    text_only: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "problems": [asdict(p) for p in self.problems]}


def convert_file(src: str | Path, fmt: str, out: str | Path, skip_bad: bool = False) -> ConvertResult:
    """Convert `src`; write `out` (atomically) unless a row is bad and `skip_bad` is False."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", 2)
    src, out = Path(src), Path(out)
    result = ConvertResult(str(src), str(out), fmt)
    rows = _csv_rows(src, result) if fmt == "csv" else _json_rows(src)
    convert_row = _messages_row if fmt == "messages" else _qa_row
    ids: dict[str, str] = {}
    samples: list[str] = []
    system_dropped = 0
    for where, row in rows:
        result.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            if not isinstance(row, dict):
                raise BadRow(f"expected an object, got {type(row).__name__}")
            given, image, turns, dropped = convert_row(row)
            system_dropped += dropped
            sample = _llava_sample(image, turns)
            sample_id = _assign_id(given, sample, ids, where)
        except BadRow as bad:
            result.problems.append(Problem(where, str(bad)))
            continue
        samples.append(json.dumps({"id": sample_id, **sample}, ensure_ascii=False))
        if image is None:
            result.text_only += 1
        else:
            result.with_image += 1
    if system_dropped:
        result.notes.append(f"dropped {system_dropped} system message(s): the training template brings its own")
    if result.problems and not skip_bad:
        result.with_image = result.text_only = 0
        return result
    if out.suffix.lower() in (".jsonl", ".ndjson"):
        atomic_write_text(out, "".join(s + "\n" for s in samples))
    else:
        atomic_write_text(out, "[\n" + ",\n".join(samples) + "\n]\n")
    result.written = len(samples)
    return result


def _assign_id(given: str | None, sample: dict[str, Any], ids: dict[str, str], where: str) -> str:
    """The given id (unique), else a content hash; identical rows get -2, -3 ... in file order."""
    if given is not None:
        if given in ids:
            raise BadRow(f"id {given!r} is already used by {ids[given]}")
        ids[given] = where
        return given
    digest = hashlib.sha1(json.dumps(sample, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    candidate, n = digest, 1
    while candidate in ids:
        n += 1
        candidate = f"{digest}-{n}"
    ids[candidate] = where
    return candidate


def _llava_sample(image: str | None, turns: list[tuple[str, str]]) -> dict[str, Any]:
    """Roles human/gpt, alternating, human first, a reply last; `<image>` once, in the first human turn."""
    if not turns:
        raise BadRow("no user/assistant turns")
    for i, (role, text) in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise BadRow(f"turn {i} is from {role!r} where {expected!r} was expected (human first, alternating)")
        if not text.strip() and not (i == 0 and image is not None):
            raise BadRow(f"turn {i} ({role}) is empty")
    if turns[-1][0] != "gpt":
        raise BadRow("the last turn is a question without an answer")
    placed = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if image is None and placed:
        raise BadRow(f"text contains {IMAGE_TOKEN} but the row has no image")
    if placed > 1:
        raise BadRow(f"text contains {IMAGE_TOKEN} {placed} times; a sample carries one image")
    conversations = [{"from": role, "value": text.strip()} for role, text in turns]
    if image is not None and not placed:
        first = conversations[0]["value"]
        conversations[0]["value"] = f"{IMAGE_TOKEN}\n{first}" if first else IMAGE_TOKEN
    return ({"image": image} if image is not None else {}) | {"conversations": conversations}


def _given_id(row: dict[str, Any]) -> str | None:
    value = row.get("id")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise BadRow(f"id must be a string or integer, got {type(value).__name__}")
    return str(value).strip()


def _image_ref(value: Any, where: str) -> str:
    """A relative or local path; remote URLs and embedded bytes must be materialised first."""
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"{where}: image must be a file path, got {type(value).__name__}")
    value = value.strip()
    if value.startswith("data:"):
        raise BadRow(f"{where}: embedded image data; save it to a file under the image folder first")
    if value.startswith(("http://", "https://", "s3://", "gs://")):
        raise BadRow(f"{where}: remote image {value!r}; download it under the image folder first")
    return value.removeprefix("file://")


def _qa_row(row: dict[str, Any]) -> tuple[str | None, str | None, list[tuple[str, str]], int]:
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise BadRow(f"{key} is missing or empty")
    raw_image = row.get("image")
    image = None if raw_image is None or raw_image == "" else _image_ref(raw_image, "image")
    return _given_id(row), image, [("human", row["question"]), ("gpt", row["answer"])], 0


def _messages_row(row: dict[str, Any]) -> tuple[str | None, str | None, list[tuple[str, str]], int]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRow("no `messages` list")
    top = row.get("images", row.get("image"))
    top_images = [top] if isinstance(top, str) else list(top or [])
    refs: list[str] = []
    placeholders = 0
    turns: list[tuple[str, str]] = []
    system = 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role == "system":
            system += 1
            continue
        if role not in ROLE_MAP:
            raise BadRow(f"{where}.role: unsupported role {role!r} (user, assistant, system)")
        content = msg.get("content")
        texts: list[str] = []
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise BadRow(f"{where}.content must be a string or a list of parts")
        for j, part in enumerate(parts):
            at = f"{where}.content[{j}]"
            kind = "text" if isinstance(part, str) else part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part if isinstance(part, str) else part.get("text")
                if not isinstance(text, str):
                    raise BadRow(f"{at}.text must be a string")
                texts.append(text)
            elif kind in ("image", "image_url"):
                if role != "user":
                    raise BadRow(f"{at}: an image in an assistant message")
                ref = part.get("image", part.get("path", part.get("url"))) if kind == "image" else part.get("image_url")
                ref = ref.get("url") if isinstance(ref, dict) else ref
                if ref is None:
                    placeholders += 1
                else:
                    refs.append(_image_ref(ref, at))
            else:
                raise BadRow(f"{at}: unsupported part {kind!r} (text, image, image_url)")
        turns.append((ROLE_MAP[role], "\n".join(t.strip() for t in texts if t.strip())))
    if placeholders > len(top_images):
        raise BadRow(f"{placeholders} image placeholder(s) but {len(top_images)} entries in `images`")
    refs += [_image_ref(img, "images") for img in top_images[:placeholders]]
    if not refs and not placeholders and len(top_images) == 1:
        refs = [_image_ref(top_images[0], "images")]
    if len(refs) > 1:
        raise BadRow(f"{len(refs)} images; a LLaVA sample carries one")
    return _given_id(row), (refs[0] if refs else None), turns, system


def _csv_rows(src: Path, result: ConvertResult) -> Iterator[tuple[str, Any]]:
    if not src.is_file():
        raise UserError(f"source file not found: {src}", 2)
    with open(src, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        try:
            header = [(name or "").strip().lower() for name in (reader.fieldnames or [])]
            missing = [f for f in QA_FIELDS if f not in header]
            if missing:
                raise UserError(f"{src}: the CSV header needs columns image, question, answer; "
                                f"missing {', '.join(missing)} (header: {', '.join(header) or 'none'})", 2)
            extra = [h for h in header if h not in (*QA_FIELDS, "id")]
            if extra:
                result.notes.append(f"ignored column(s): {', '.join(extra)}")
            reader.fieldnames = header
            for n, row in enumerate(reader, 1):
                if None in row:
                    yield f"row {n} (line {reader.line_num})", BadRow("more fields than the header has columns")
                    continue
                yield f"row {n} (line {reader.line_num})", {k: v for k, v in row.items() if v is not None}
        except csv.Error as err:
            raise UserError(f"{src} line {reader.line_num}: not valid CSV: {err}", 2) from None
        except UnicodeDecodeError as err:
            raise UserError(f"{src}: not UTF-8 text ({err.reason})", 2) from None


def _json_rows(src: Path) -> Iterator[tuple[str, Any]]:
    reader = SampleReader(src)
    for record in reader:
        where = f"row {record.index + 1}"
        if record.error is None:
            yield where, record.value
        elif record.kind == "invalid_json":
            yield where, BadRow(f"invalid JSON at {record.error}")
        else:
            yield where, BadRow(f"{record.field}: {record.error}")


def render(result: ConvertResult, cap: int = 50) -> None:
    from rich.markup import escape

    from llava_cluster.console import console

    for problem in result.problems[:cap]:
        console.print(f"[red]bad[/] {problem.row}: {escape(problem.message)}", highlight=False, soft_wrap=True)
    if len(result.problems) > cap:
        console.print(f"[dim]… and {len(result.problems) - cap} more bad rows (--json lists all)[/]")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if result.written or not result.problems:
        skipped = f", skipped {len(result.problems)} bad row(s)" if result.problems else ""
        console.print(f"[green]wrote[/] {result.written:,} samples ({result.with_image:,} with image, "
                      f"{result.text_only:,} text-only) to {escape(result.out)}{skipped}", highlight=False)
    else:
        console.print(f"[red]nothing written:[/] {len(result.problems):,} bad row(s) of {result.rows:,}; "
                      "fix them or pass --skip-bad", highlight=False)
