"""merge/memory.py: an in-memory merge is chosen only when the checkpoint (upcast if asked) fits."""

from __future__ import annotations

from llava_cluster.merge import memory
from llava_cluster.merge.memory import checkpoint_bytes, fits_in_memory


def test_fits_in_memory_compares_checkpoint_with_available_ram(tiny_dir, monkeypatch):
    size = checkpoint_bytes(tiny_dir.model)
    assert size == (tiny_dir.model / "model.safetensors").stat().st_size
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: int(size * 1.5))
    assert fits_in_memory(tiny_dir.model)
    assert not fits_in_memory(tiny_dir.model, dtype="fp32")  # an upcast doubles what must fit
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: size)
    assert not fits_in_memory(tiny_dir.model)


def test_available_memory_is_capped_by_the_cgroup_limit(monkeypatch, tmp_path):
    """A SLURM job or a pod sees the node's free memory in /proc/meminfo, but may use only its limit."""
    from pathlib import Path

    files = {"/proc/meminfo": "MemTotal: 64000000 kB\nMemAvailable: 32000000 kB\n",
             "/sys/fs/cgroup/memory.max": "8000000000\n", "/sys/fs/cgroup/memory.current": "3000000000\n"}
    real_read, real_is_file = Path.read_text, Path.is_file

    def read_text(self, *args, **kwargs):
        if str(self) in files:
            return files[str(self)]
        if str(self).startswith("/sys/fs/cgroup/"):
            raise OSError(str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(Path, "is_file", lambda self: str(self) in files or real_is_file(self))
    assert memory.available_memory_bytes() == 8_000_000_000 - 3_000_000_000
    files["/sys/fs/cgroup/memory.max"] = "max\n"  # no limit: MemAvailable
    assert memory.available_memory_bytes() == 32_000_000 * 1024
