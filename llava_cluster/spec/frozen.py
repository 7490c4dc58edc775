"""The spec frozen into a run directory (`spec.yaml`): written once by rank 0, and a different spec under
the same run name refused, not overwritten. Used by `submit` on the submitting machine and by the stage
job (a spec handed to a pod, or to a re-submitted run)."""

from __future__ import annotations

from llava_cluster.errors import UserError
from llava_cluster.rundir import RunDir, atomic_write_text, is_rank0
from llava_cluster.spec.load import load_spec
from llava_cluster.spec.sections import RunSpec


def frozen_spec_conflict(spec: RunSpec, run: RunDir) -> str | None:
    """Why `spec` cannot be frozen into `run` (a different spec is there already), or None."""
    if not run.spec_path.exists():
        return None
    frozen = load_spec(run.spec_path)
    if frozen.digest() == spec.digest():
        return None
    old, new = frozen.to_dict(), spec.to_dict()
    changed = sorted(k for k in new if old.get(k) != new.get(k))
    return (f"{run.root} already holds run {spec.name!r} with a different spec (sections differing: "
            f"{', '.join(changed)}); pick a new name, or delete that run directory to start over")


def freeze(spec: RunSpec, run: RunDir) -> None:
    """Write spec.yaml once; a different spec under the same run name is refused, not overwritten."""
    conflict = frozen_spec_conflict(spec, run)
    if conflict:
        raise UserError(conflict)
    if not run.spec_path.exists() and is_rank0():
        atomic_write_text(run.spec_path, spec.to_yaml())
