"""Which spec fields name files, and reading or setting a field by its dotted name (`data.train`,
`validation.lmms_eval.include_path`). One rule for every user of it: load makes these paths absolute,
the container check refuses commas in them, and Kubernetes wants them on its volume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Always a path (or a URL, left alone): every node must see it at the same place.
PATH_FIELDS = ("storage", "model.base", "data.train", "data.eval", "data.image_folder",
               "validation.lmms_eval.include_path")
DEEPSPEED_FIELD = "training.deepspeed"  # a path when it names a .json, else a preset name
FILE_FIELDS = ("data.train", "data.eval", DEEPSPEED_FIELD)  # files; the other path fields are folders
# An interpreter: a path when it holds a "/", else a name looked up on PATH where it runs.
PROGRAM_FIELDS = ("validation.lmms_eval.python",)


def field_value(spec: Any, dotted: str) -> Any:
    """The value at `dotted`; None when a section on the way is unset (an optional block)."""
    node = spec
    for part in dotted.split("."):
        if node is None:
            return None
        node = getattr(node, part)
    return node


def set_field(spec: Any, dotted: str, value: Any) -> None:
    section, _, attr = dotted.rpartition(".")
    setattr(field_value(spec, section) if section else spec, attr, value)


def local_paths(spec: Any) -> dict[str, str]:
    """The files and folders a run reads or writes, by dotted field: the set PATH_FIELDS that are not
    URLs, and the DeepSpeed JSON when there is one."""
    found = {dotted: field_value(spec, dotted) for dotted in PATH_FIELDS}
    found[DEEPSPEED_FIELD] = field_value(spec, DEEPSPEED_FIELD)
    return {dotted: value for dotted, value in found.items()
            if value and "://" not in value and (dotted != DEEPSPEED_FIELD or value.endswith(".json"))}


def make_absolute(spec: Any, base: Path) -> None:
    """Relative paths become absolute against `base`, with `~` expanded. Data paths are resolved; an
    interpreter's path keeps its links (a virtual environment's python is a link out of it)."""
    for dotted, value in local_paths(spec).items():
        set_field(spec, dotted, str((base / Path(value).expanduser()).resolve()))
    for dotted in PROGRAM_FIELDS:
        value = field_value(spec, dotted)
        if value and "/" in value:
            set_field(spec, dotted, os.path.abspath(base / Path(value).expanduser()))
