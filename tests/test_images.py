"""The one image opener: contained, regular files only, a pixel limit, header-only sizes, named errors."""

from __future__ import annotations

import os

import pytest
from hostile_files import make_special_files, no_hang, png_header
from PIL import Image

from llava_cluster.data.images import MAX_PIXELS, ImageFolder, ImageProblem
from llava_cluster.errors import UserError


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 0, 0)).save(images / "red.png")
    os.symlink(images / "red.png", images / "sub" / "alias.png")  # a symlink that stays inside is fine
    return images


def kind_of(images: ImageFolder, rel: str) -> str | None:
    try:
        with no_hang():
            images.verify(rel)
    except ImageProblem as problem:
        return problem.kind
    return None


def test_special_files_are_refused_with_their_kind_and_never_block(folder):
    expected = make_special_files(folder)
    images = ImageFolder(folder)
    assert {rel: kind_of(images, rel) for rel in expected} == expected
    with no_hang():
        for rel in expected:
            with pytest.raises(ImageProblem):
                images.size(rel)


@pytest.mark.parametrize("rel, kind", [
    ("/etc/passwd", "image_path_unsafe"), ("../images/red.png", "image_path_unsafe"),
    ("a\0b.png", "image_path_unsafe"), ("sub/../red.png", None), ("sub/alias.png", None), ("./red.png", None)])
def test_paths_must_stay_inside_the_folder(folder, rel, kind):
    assert kind_of(ImageFolder(folder), rel) == kind


def test_an_absolute_path_inside_the_folder_is_still_refused(folder):
    assert kind_of(ImageFolder(folder), str(folder / "red.png")) == "image_path_unsafe"


def test_size_reads_the_header_only_and_load_decodes(folder):
    (folder / "header-only.png").write_bytes(png_header(4000, 3000))  # pixel data far too short
    images = ImageFolder(folder)
    assert images.size("header-only.png") == (4000, 3000)
    assert kind_of(images, "header-only.png") == "image_corrupt"
    assert images.size("red.png") == (40, 30)
    rgb = images.load_rgb("red.png")
    assert (rgb.mode, rgb.size, rgb.getpixel((0, 0))) == ("RGB", (40, 30), (200, 0, 0))


def test_pixel_limit_names_the_dimensions(folder):
    (folder / "bomb.png").write_bytes(png_header(30000, 30000))
    with pytest.raises(ImageProblem) as err:
        ImageFolder(folder).size("bomb.png")
    assert err.value.kind == "image_too_large" and f"limit of {MAX_PIXELS:,}" in err.value.message
    (folder / "big.png").write_bytes(png_header(9000, 9000))  # ours refuses it; Pillow would only warn
    with pytest.raises(ImageProblem, match="9000x9000 = 81,000,000 pixels, more than the limit"):
        ImageFolder(folder).size("big.png")
    assert ImageFolder(folder, max_pixels=40 * 30).size("red.png") == (40, 30)
    assert kind_of(ImageFolder(folder, max_pixels=40 * 30 - 1), "red.png") == "image_too_large"


def test_training_error_names_sample_and_path(folder):
    (folder / "bomb.png").write_bytes(png_header(30000, 30000))
    with pytest.raises(UserError) as err:
        ImageFolder(folder).load_for_sample("s-7", "bomb.png")
    assert "sample s-7" in err.value.message and "'bomb.png'" in err.value.message
    assert "pixels, more than the limit" in err.value.message


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="image folder not found"):
        ImageFolder(tmp_path / "nope")
