"""Structural checks of one LLaVA record, without touching the disk.

A record is {"id": str, "image"?: str, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}.
Every problem becomes a `Defect` naming the sample (index and id) and the exact field, so a user can
fix a 665k-sample file from the report alone. I/O checks (image files, JSON syntax, token lengths)
live in `check.py` and produce the same records.
"""

from __future__ import annotations

import posixpath
import reprlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from llava_cluster.data.templates import IMAGE_TOKEN

ROLES = ("human", "gpt")

# kind -> what it means; the order is the order of the summary table.
DEFECT_KINDS: dict[str, str] = {
    "invalid_json": "not valid JSON",
    "invalid_text": "text that is not Unicode (a lone surrogate): cannot be written as UTF-8 or tokenized",
    "not_an_object": "a sample that is not a JSON object",
    "missing_id": "no id",
    "duplicate_id": "id used by an earlier sample",
    "wrong_type": "a field of the wrong type",
    "missing_conversations": "no conversations, or an empty list",
    "unknown_role": "`from` is not human/gpt",
    "first_not_human": "the first turn is not from human",
    "not_alternating": "two turns in a row from the same side",
    "unanswered_turn": "the last human turn has no gpt reply",
    "empty_value": "an empty or blank turn",
    "image_token_missing": "an image but no <image> in the text",
    "image_token_unexpected": "<image> in a sample without an image",
    "image_token_repeated": "<image> more than once",
    "image_token_misplaced": "<image> in a turn other than the first human turn",
    "image_path_unsafe": "image path absolute or outside the image folder",
    "image_missing": "image file not found",
    "image_empty": "image file of zero bytes",
    "image_unreadable": "image file cannot be read",
    "image_corrupt": "image file does not decode",
    "image_too_large": "image of more pixels than the limit (a decompression bomb, or far too big to train on)",
    "too_long": "longer than --max-length: truncation drops tokens",
    "first_round_too_long": "even the first round exceeds --max-length: the sample trains on nothing",
}


@dataclass(slots=True)
class Defect:
    index: int  # position of the sample in the file (0-based); for invalid JSON, the line number
    id: str | None
    field: str  # e.g. "conversations[2].value", "image", "(json)"
    kind: str  # a key of DEFECT_KINDS
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Defects that say nothing about the text: such a sample still tokenizes, so its length is measured.
_TEXT_NEUTRAL = {"duplicate_id", "image_path_unsafe", "image_missing", "image_empty", "image_unreadable",
                 "image_corrupt", "image_too_large"}


def blocks_encoding(defect: Defect) -> bool:
    """Whether this defect makes the sample's conversation unfit to tokenize (id problems never do, except
    text that is not Unicode: only its first occurrence in a sample is named)."""
    return defect.kind == "invalid_text" or (defect.field != "id" and defect.kind not in _TEXT_NEUTRAL)


def sample_id(sample: Any) -> str | None:
    """The id as text for reports, whatever its type (a deep or huge one shortened); None when absent."""
    if isinstance(sample, dict) and sample.get("id") is not None:
        sid = sample["id"]
        return sid if isinstance(sid, str) else reprlib.repr(sid)
    return None


def image_path_problem(path: str) -> str | None:
    """Why a relative image path is unsafe (a NUL byte, absolute, or climbing out with ..), else None."""
    if "\0" in path:
        return f"{path!r} contains a NUL byte, which no file name can hold"
    if ".." not in path and path[:1] not in ("/", "\\") and path[1:2] != ":":
        return None
    if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        return f"absolute path {path!r}: image paths must be relative to --image-folder"
    norm = posixpath.normpath(path.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return f"path {path!r} climbs out of the image folder with '..'"
    return None


def check_sample(index: int, sample: Any) -> list[Defect]:
    """Every structural defect of one record (ids are checked for duplicates by the caller)."""
    if not isinstance(sample, dict):
        return [Defect(index, None, "(sample)", "not_an_object",
                       f"expected a JSON object, got {type(sample).__name__}")]
    sid = sample_id(sample)
    found: list[Defect] = []

    def add(field: str, kind: str, message: str) -> None:
        found.append(Defect(index, sid, field, kind, message))

    if sample.get("id") is None or sample.get("id") == "":
        add("id", "missing_id", "sample has no id")
    elif not isinstance(sample["id"], str):
        add("id", "wrong_type", f"id must be a string, got {type(sample['id']).__name__} {sid}")

    image = sample.get("image")
    has_image = image is not None
    if has_image:
        if not isinstance(image, str):
            add("image", "wrong_type",
                f"image must be a string path, got {type(image).__name__} (one image per sample)")
        elif not image.strip():
            add("image", "empty_value", "image path is empty")
        elif problem := image_path_problem(image):
            add("image", "image_path_unsafe", problem)

    conversations = sample.get("conversations")
    if conversations is None or conversations == []:
        add("conversations", "missing_conversations",
            "no conversations" if conversations is None else "conversations is empty")
        return found
    if not isinstance(conversations, list):
        add("conversations", "wrong_type", f"conversations must be a list, got {type(conversations).__name__}")
        return found

    image_tokens: list[str] = []
    previous_role: str | None = None
    for t, turn in enumerate(conversations):
        # Fast path for a well-formed turn: no strings are built unless something is wrong.
        if type(turn) is dict:
            role, value = turn.get("from"), turn.get("value")
            if ((role == "human" or role == "gpt") and role != previous_role and (t or role == "human")
                    and type(value) is str and value and not value.isspace()):
                if IMAGE_TOKEN in value:
                    image_tokens.extend([f"conversations[{t}].value"] * value.count(IMAGE_TOKEN))
                previous_role = role
                continue
        previous_role = _turn_defects(t, turn, previous_role, image_tokens, add)
    last = conversations[-1]
    if isinstance(last, dict) and last.get("from") == "human":
        add(f"conversations[{len(conversations) - 1}]", "unanswered_turn",
            "the conversation ends with a human turn that no gpt turn answers")

    if has_image and not image_tokens:
        add("conversations", "image_token_missing", f"sample has image {image!r} but no {IMAGE_TOKEN} in any turn")
    elif not has_image and image_tokens:
        add(image_tokens[0], "image_token_unexpected", f"{IMAGE_TOKEN} in a sample without an `image` field")
    if len(image_tokens) > 1:
        add(image_tokens[1], "image_token_repeated",
            f"{IMAGE_TOKEN} appears {len(image_tokens)} times; one image per sample means exactly one")
    elif has_image and image_tokens and image_tokens[0] != "conversations[0].value":
        add(image_tokens[0], "image_token_misplaced",
            f"{IMAGE_TOKEN} must be in the first human turn (conversations[0]), where training puts the image")
    return found


def _turn_defects(t: int, turn: Any, previous_role: str | None, image_tokens: list[str],
                  add: Callable[[str, str, str], None]) -> str | None:
    """The defects of one turn that failed the fast path; returns its role for the alternation check."""
    where = f"conversations[{t}]"
    if not isinstance(turn, dict):
        add(where, "wrong_type", f"a turn must be an object, got {type(turn).__name__}")
        return None
    role, value = turn.get("from"), turn.get("value")
    if not isinstance(role, str):
        add(f"{where}.from", "wrong_type" if role is not None else "unknown_role",
            f"`from` must be a string, got {type(role).__name__}" if role is not None else "turn has no `from`")
    elif role not in ROLES:
        add(f"{where}.from", "unknown_role", f"unknown role {role!r} (expected 'human' or 'gpt')")
    elif t == 0 and role != "human":
        add(f"{where}.from", "first_not_human", f"first turn is from {role!r}; it must be from 'human'")
    elif role == previous_role:
        add(f"{where}.from", "not_alternating", f"two {role!r} turns in a row (turns {t - 1} and {t})")
    if not isinstance(value, str):
        add(f"{where}.value", "wrong_type" if value is not None else "empty_value",
            f"`value` must be a string, got {type(value).__name__}" if value is not None else "turn has no `value`")
    elif not value.strip():
        add(f"{where}.value", "empty_value", "empty text")
    elif IMAGE_TOKEN in value:
        image_tokens.extend([f"{where}.value"] * value.count(IMAGE_TOKEN))
    return role if isinstance(role, str) else None
