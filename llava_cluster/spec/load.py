"""Loading a run spec: YAML (plain data, bounded), `key=value` overrides, validation with one message
per problem that says what to change, and relative paths made absolute.

Relative paths in a spec are resolved against the directory the command runs from, and frozen as
absolute paths: every node of a cluster must see them at the same place (shared storage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import ComposerError

from llava_cluster.errors import UserError
from llava_cluster.spec.paths import make_absolute
from llava_cluster.spec.sections import RunSpec

MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_DEPTH = 32


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in assignment:
        raise UserError(f"override {assignment!r} is not key=value (e.g. optim.lr=1e-4)")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = parse_yaml(raw, f"override {assignment!r}") if raw.strip() else None


class _SpecLoader(yaml.SafeLoader):
    """safe_load without aliases (a billion-laughs block expands exponentially when the spec is
    validated, dumped and hashed) and with a bounded nesting depth (the composer recurses)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise ComposerError(None, None, "YAML aliases (*name) are not allowed in a run spec; write the "
                                "values out", self.peek_event().start_mark)
        depth = self._depth + 1
        if depth > MAX_SPEC_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_SPEC_DEPTH} levels",
                                self.peek_event().start_mark)
        self._depth = depth
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth - 1


def parse_yaml(text: str, source: str) -> Any:
    """YAML of a spec or an override value: plain data only, bounded; every failure a UserError."""
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML for a run spec (plain mappings, lists and scalars; no "
                        f"!!python or other tags): {err}") from None


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds, also when it is optional (`LmmsEvalSpec | None`)."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys a spec section accepts, for a did-you-mean on an unknown one."""
    model: type[BaseModel] | None = RunSpec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = _section_of(getattr(field, "annotation", None))
        if model is None:
            return []
    return list(model.model_fields)


def _format_errors(source: str, err: ValidationError, overrides: dict[str, str]) -> str:
    """One line per problem: where, what, the value given, and whether it came from the command line."""
    import difflib

    lines = [f"{source}: the run spec is not valid:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _keys_at(e["loc"][:-1]), n=1)
            msg = f"unknown key; did you mean {'.'.join([*map(str, e['loc'][:-1]), close[0]])!r}?" if close \
                else "unknown key (typo?)"
        elif e["type"] == "missing":
            msg = "required, missing"
        elif not isinstance(e.get("input"), dict | list):
            msg += f" (got {str(e['input'])[:60]!r})"
        if where in overrides:
            msg += f" [from the command line: {overrides[where]}]"
        lines.append(f"  {where}: {msg}" if e["loc"] else f"  {msg}")
    return "\n".join(lines)


def spec_from_dict(data: dict[str, Any], source: str = "spec", overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Validate, then make relative paths absolute against the current directory (where validation has
    also read a relative DeepSpeed JSON from)."""
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as err:
        given = {a.split("=", 1)[0].strip(): a for a in overrides}
        raise UserError(_format_errors(source, err, given)) from None
    make_absolute(spec, Path.cwd())
    return spec


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read a YAML spec (or a frozen spec.yaml), apply overrides, validate, absolutise paths."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"run spec not found: {path}")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise UserError(f"{path}: {size} bytes is too large for a run spec (at most {MAX_SPEC_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise UserError(f"{path}: a run spec is a YAML mapping (name:, storage:, model:, data:, ...)")
    for assignment in overrides:
        apply_override(data, assignment)
    return spec_from_dict(data, source=str(path), overrides=overrides)
