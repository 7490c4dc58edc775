"""The package's rooms import in one direction, read from the source with `ast` (nothing is imported).

A module's room is its first name under `llava_cluster/`: the package (`model/`, `data/`, `train/`, ...)
or the top-level module (`stage.py`, `submit.py`, ...). Imports inside functions count like the others:
a lazy import is still an arrow.

    model/    a checkpoint's loading, the family table, the image token: only itself and shared helpers
    data/     reading, checking, encoding conversations: also model/ (the processor counts tokens)
    job side  stage.py and train/ run inside the job: never the client side (submit, status, the CLI...)
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llava_cluster"

SHARED = {"errors", "console", "noise", "precision", "rundir"}  # helpers any room may use
MAY_IMPORT_ONLY = {
    "model": {"model"} | SHARED,
    "data": {"data", "model"} | SHARED,
}
CLIENT_SIDE = {"cli", "submit", "train_local", "status", "logs", "find_run", "plan", "demo"}
JOB_SIDE = {"stage", "stage_record", "train"}


def room_of(path: Path, package: Path = PACKAGE) -> str:
    """`model` for llava_cluster/model/load.py, `stage` for llava_cluster/stage.py."""
    first = path.relative_to(package).parts[0]
    return first.removesuffix(".py")


def _module_of(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
    return ".".join(["llava_cluster", *parts[:-1]] if parts[-1] == "__init__" else ["llava_cluster", *parts])


def package_imports(path: Path, package: Path = PACKAGE) -> list[tuple[int, str, str]]:
    """(line, imported module, its room) of every import of a `llava_cluster` module in `path`."""
    module = _module_of(path, package)
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from llava_cluster import train` imports a room; `from llava_cluster import __version__` does not
            targets = [f"{base}.{alias.name}" if base == "llava_cluster" else base for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            if parts[0] != "llava_cluster" or len(parts) < 2:
                continue
            if not ((package / parts[1]).is_dir() or (package / f"{parts[1]}.py").is_file()):
                continue  # a name defined in llava_cluster/__init__.py
            found.append((node.lineno, target, parts[1]))
    return found


def forbidden_imports(path: Path, package: Path = PACKAGE) -> list[str]:
    """'file:line -> module (why)' for each import of `path` that runs against the rooms' direction."""
    room = room_of(path, package)
    where = path.relative_to(package.parent)
    out = []
    for line, target, target_room in package_imports(path, package):
        allowed = MAY_IMPORT_ONLY.get(room)
        if allowed is not None and target_room not in allowed:
            out.append(f"{where}:{line} -> {target} ({room}/ may import only {', '.join(sorted(allowed))})")
        elif room in JOB_SIDE and target_room in CLIENT_SIDE:
            out.append(f"{where}:{line} -> {target} (job-side {room} must not import the client side)")
    return out


@functools.cache
def modules() -> tuple[Path, ...]:
    return tuple(sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts))


def test_every_room_imports_only_downwards():
    problems = [problem for path in modules() for problem in forbidden_imports(path)]
    assert not problems, "imports against the rooms' direction:\n  " + "\n  ".join(problems)


def test_the_scan_sees_lazy_and_relative_imports_and_names_the_line(tmp_path):
    """A checker that found nothing would pass: on a planted module it must name both arrows back up."""
    fake = tmp_path / "llava_cluster"
    for room in ("model", "data", "train"):
        (fake / room).mkdir(parents=True)
        (fake / room / "__init__.py").write_text("")
    (fake / "submit.py").write_text("")
    (fake / "errors.py").write_text("")
    planted = fake / "model" / "load.py"
    planted.write_text("from llava_cluster.errors import UserError\n\n\ndef load():\n"
                       "    from ..data import templates\n    return templates\n")
    (fake / "train" / "run.py").write_text("import llava_cluster.submit\nfrom llava_cluster import __version__\n")

    assert package_imports(planted, fake) == [(1, "llava_cluster.errors", "errors"), (5, "llava_cluster.data", "data")]
    assert forbidden_imports(planted, fake) == [
        "llava_cluster/model/load.py:5 -> llava_cluster.data (model/ may import only console, errors, model, "
        "noise, precision, rundir)"]
    assert forbidden_imports(fake / "train" / "run.py", fake) == [
        "llava_cluster/train/run.py:1 -> llava_cluster.submit (job-side train must not import the client side)"]


def test_the_real_tree_has_the_arrows_the_rules_speak_of():
    """The arrows that do run downwards are seen: data/ -> model/, train/ -> data/ and model/."""
    edges = {(room_of(path), target_room) for path in modules() for _, _, target_room in package_imports(path)}
    assert {("data", "model"), ("train", "data"), ("train", "model")} <= edges
    assert ("model", "data") not in edges


def rooms() -> set[str]:
    """Every room of the package: its sub-packages and top-level modules."""
    return {room_of(path) for path in modules() if path.parent != PACKAGE or path.name != "__init__.py"}


def readme_layout_rooms(readme: Path = PACKAGE.parent / "README.md") -> set[str]:
    """The rooms the README's "Package layout" block names: the words before the description on each
    unindented line (`model/`, `adapter.py`, `errors console ...`)."""
    section = readme.read_text().split("## Package layout", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    heads = [line.split("  ", 1)[0] for line in block.splitlines() if line and not line[0].isspace()]
    return {word.removesuffix("/").removesuffix(".py") for head in heads for word in head.split()}


def test_the_readme_layout_names_every_room():
    named = readme_layout_rooms()
    missing, stale = sorted(rooms() - named), sorted(named - rooms())
    assert not missing, f"README's Package layout does not name: {', '.join(missing)}"
    assert not stale, f"README's Package layout names what is not in the package: {', '.join(stale)}"
