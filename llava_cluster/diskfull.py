"""A full disk (or quota) reaches us as OSError ENOSPC/EDQUOT from Python, or as a RuntimeError from
torch's C++ writer that has lost the errno ("basic_ios::clear: iostream error"). One test for all of
them and one message naming the storage, its free space and what a checkpoint of this run needs."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

TORCH_WRITE_FAILURES = ("iostream error", "PytorchStreamWriter failed", "file write failed",
                        "No space left on device")
NEARLY_FULL = 64 * 2**20  # a torch write failure with less free than this is the disk being full


def _mount(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def is_disk_full(err: BaseException, storage: Path) -> bool:
    """`err`, or an exception it was raised from, says the disk under `storage` is full."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(current, RuntimeError) and any(s in str(current) for s in TORCH_WRITE_FAILURES):
            return is_nearly_full(storage)
        current = current.__cause__ or current.__context__
    return False


def is_nearly_full(storage: Path) -> bool:
    try:
        return shutil.disk_usage(_existing(storage)).free < NEARLY_FULL
    except OSError:
        return False


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full_message(storage: Path, checkpoint: Path | None = None) -> str:
    """Which storage is full, how full, and (with the last complete checkpoint) how much one save needs."""
    where = _existing(storage)
    try:
        usage = shutil.disk_usage(where)
        space = f"{_human(usage.free)} free of {_human(usage.total)}"
    except OSError:
        space = "free space unknown"
    need = ""
    if checkpoint is not None:
        need = f"; one checkpoint of this run takes {_human(_size(checkpoint))} ({checkpoint.name})"
    resume = f"resumes from {checkpoint.name}" if checkpoint is not None else "starts again"
    return (f"no space left on the storage of {storage} (filesystem {_mount(where)}: {space}{need}). "
            f"Free space or raise the quota, then resubmit: the stage {resume}.")
