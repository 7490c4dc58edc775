"""Which run directory a user means: `status`/`logs` take a run directory, the spec file it was
submitted with (with the same KEY=VALUE overrides), or a run's name (under --storage, or the storage
of the spec of that name in ./jobs/)."""

from __future__ import annotations

from pathlib import Path

import yaml

from llava_cluster.errors import UserError

JOBS = Path("jobs")


def _spec_named(name: str) -> Path | None:
    """The spec in ./jobs/ whose `name:` is `name` (its file name first)."""
    candidates = [JOBS / f"{name}.yaml", *sorted(JOBS.glob("*.yaml"))] if JOBS.is_dir() else []
    for path in candidates:
        try:
            text = yaml.safe_load(path.read_text()) if path.is_file() else None
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(text, dict) and text.get("name") == name:
            return path
    return None


def resolve_run_dir(target: str | Path, overrides: list[str] | tuple[str, ...] = (),
                    storage: Path | None = None) -> Path:
    """The run directory for a run directory, a spec file or a run name."""
    from llava_cluster.spec import load_spec

    path = Path(target)
    if path.is_dir():
        return path
    if path.is_file():
        return load_spec(path, list(overrides)).run_dir
    if storage is not None:
        return storage / "runs" / str(target)
    if len(path.parts) == 1:
        spec = _spec_named(str(target))
        if spec is not None:
            return load_spec(spec, list(overrides)).run_dir
    raise UserError(f"{target}: not a run directory, a spec file, or the name of a spec in ./{JOBS}/; "
                    f"give the run directory (<storage>/runs/<name>), or the name with --storage DIR")
