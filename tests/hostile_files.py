"""Files a hostile or broken dataset can name as an image, shared by the image and data-tool tests."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, one tiny IDAT and IEND: a few dozen bytes
    that claim any number of pixels (the shape of a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def make_special_files(folder: Path) -> dict[str, str]:
    """Create in `folder` every special kind of file an `image` path can name; {name: expected defect kind}."""
    outside = folder.parent / "outside.png"
    outside.write_bytes(png_header(8, 8))
    os.mkfifo(folder / "fifo.png")
    os.symlink(folder / "loop-b.png", folder / "loop-a.png")
    os.symlink(folder / "loop-a.png", folder / "loop-b.png")
    os.symlink(outside, folder / "escape.png")
    os.symlink("/dev/zero", folder / "zero.png")
    (folder / "dir.png").mkdir()
    (folder / "bomb.png").write_bytes(png_header(30000, 30000))
    (folder / "big.png").write_bytes(png_header(9000, 9000))  # over our limit, under Pillow's own warning
    (folder / "empty.png").write_bytes(b"")
    return {"fifo.png": "image_unreadable", "loop-a.png": "image_unreadable", "escape.png": "image_path_unsafe",
            "zero.png": "image_path_unsafe", "dir.png": "image_unreadable", "bomb.png": "image_too_large",
            "big.png": "image_too_large", "empty.png": "image_empty", "missing.png": "image_missing"}


class Hung(BaseException):
    """Not an Exception: no `except Exception` (or `except OSError`) in the code under test can swallow it."""


@contextlib.contextmanager
def no_hang(seconds: int = 20) -> Iterator[None]:
    """Turn a call that would block forever (a FIFO opened for reading) into a test failure."""

    def expire(signum: int, frame: object) -> None:
        raise Hung(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
