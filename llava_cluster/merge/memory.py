"""Will an in-memory merge fit? The merge command streams when it would not."""

from __future__ import annotations

import os
from pathlib import Path

from llava_cluster.merge.safetensors_io import shard_files


def checkpoint_bytes(base: Path) -> int:
    """Bytes of the base checkpoint's weight files (what a full in-memory merge must hold)."""
    return sum((base / name).stat().st_size for name in shard_files(base))


def available_memory_bytes() -> int:
    """Memory this process may still use: MemAvailable, capped by a cgroup limit (containers, SLURM)."""
    avail = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            avail = min(avail, int(limit) - usage)
        break
    return max(avail, 0)


def fits_in_memory(base: Path, dtype: str | None = None, headroom: float = 1.3) -> bool:
    """Would an in-memory `merge_and_unload` of `base` fit? Measured on a 13.2 GiB 7B checkpoint
    (benchmarks/merge_memory.py) it peaked at 14.3 GiB RSS, 1.09x the weights; `headroom` adds margin."""
    size = checkpoint_bytes(base)
    if dtype == "fp32":
        size *= 2  # a bf16/fp16 checkpoint upcast on load; an fp32 one overestimates, which is safe
    return size * headroom <= available_memory_bytes()
