"""The one way a sample's image is opened: by `data check`, `data stats`, training, validation and the report.

An `image` path comes from a data file, which may be hostile or just wrong. So a path must resolve
(symlinks included) inside the image folder, name a regular file — a FIFO would block the reader
forever, /dev/zero would never end — and declare at most `MAX_PIXELS` in its header before a
single pixel is decoded: a 30000x30000 PNG of a few KB would otherwise take 2.7 GB per loader worker.
Every refusal is an `ImageProblem` whose `kind` is the `data check` defect kind.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava_cluster.data.schema import image_path_problem
from llava_cluster.errors import UserError

# 64 MP (8000x8000, eight 4K frames): far above what a LLaVA processor keeps (336-1344 px), and below
# Pillow's own 89 MP warning, so Pillow never warns about an image we accept.
MAX_PIXELS = 64_000_000


class ImageProblem(Exception):
    """Why an image cannot be used; `kind` is a key of `schema.DEFECT_KINDS`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


class ImageFolder:
    """The folder a data file's relative `image` paths point into."""

    def __init__(self, folder: str | Path, max_pixels: int = MAX_PIXELS) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"image folder not found: {folder}", 2)
        self.root = folder.resolve()
        self.max_pixels = max_pixels

    def path(self, rel: str) -> Path:
        """The resolved file `rel` names, refused when it is not a plain relative path that stays inside."""
        if problem := image_path_problem(rel):
            raise ImageProblem("image_path_unsafe", problem)
        try:
            path = Path(os.path.realpath(self.root / rel))
        except (OSError, ValueError) as err:
            raise ImageProblem("image_unreadable", f"{rel!r}: {err}") from None
        if not path.is_relative_to(self.root):
            raise ImageProblem("image_path_unsafe",
                               f"{rel!r} resolves to {path}, outside the image folder {self.root}")
        return path

    @contextlib.contextmanager
    def open(self, rel: str) -> Iterator[Any]:
        """A Pillow image with only its header read; its size is within `max_pixels`."""
        from PIL import Image, UnidentifiedImageError

        with self._file(rel) as fh:
            try:
                img = Image.open(fh)
            except UnidentifiedImageError:
                raise ImageProblem("image_corrupt", f"{rel!r} is not an image format Pillow can read") from None
            except Image.DecompressionBombError:  # Pillow's own limit, twice its warning, is far above ours
                raise ImageProblem("image_too_large",
                                   f"{rel!r} declares over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, more than the "
                                   f"limit of {self.max_pixels:,}") from None
            except Exception as err:  # Pillow raises many types for a damaged header
                raise ImageProblem("image_corrupt", f"{rel!r} does not decode: {err}") from None
            with img:
                width, height = img.size
                if width * height > self.max_pixels:
                    raise ImageProblem("image_too_large",
                                       f"{rel!r} is {width}x{height} = {width * height:,} pixels, more than the "
                                       f"limit of {self.max_pixels:,}")
                yield img

    def size(self, rel: str) -> tuple[int, int]:
        """(width, height) from the header alone."""
        with self.open(rel) as img:
            return img.size

    def verify(self, rel: str) -> None:
        """Decode the whole file: `verify()` catches broken structure, `load()` a file cut short."""
        with self.open(rel) as img:
            _decode(rel, img.verify)
        with self.open(rel) as img:
            _decode(rel, img.load)

    def load_rgb(self, rel: str) -> Any:
        """The fully decoded image in RGB."""
        with self.open(rel) as img:
            return _decode(rel, lambda: img.convert("RGB"))

    def load_for_sample(self, sample_id: str | None, rel: str) -> Any:
        """`load_rgb` for training: a refused image is a UserError naming the sample and the path."""
        try:
            return self.load_rgb(rel)
        except ImageProblem as problem:
            raise UserError(f"sample {sample_id}: image {self.root / rel}: {problem.message} (run "
                            "`llava-cluster data check --image-folder` before training)") from None

    @contextlib.contextmanager
    def _file(self, rel: str) -> Iterator[io.BufferedReader]:
        path = self.path(rel)
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: `path` is resolved, so a
        # symlink there now was swapped in after the check. The type is then checked on the open file.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ImageProblem("image_missing", f"{rel!r} not found in {self.root}") from None
        except OSError as err:
            raise ImageProblem("image_unreadable", f"{rel!r}: {err.strerror or err}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ImageProblem("image_unreadable", f"{rel!r} is not a regular file")
            if info.st_size == 0:
                raise ImageProblem("image_empty", f"{rel!r} is empty (0 bytes)")
            os.set_blocking(fd, True)
            fh = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with fh:
            yield fh


def _decode(rel: str, step: Any) -> Any:
    try:
        return step()
    except Exception as err:  # Pillow raises many types for damaged data; each is a corrupt file
        raise ImageProblem("image_corrupt", f"{rel!r} does not decode: {err}") from None
