"""Shared fixtures. The tiny model + data are built once per test session (a few seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """TinyPaths of a 160-sample tiny LLaVA (model/, data/train.json, data/val.json, data/images/)."""
    from llava_cluster.tiny.build import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), samples=160)


@pytest.fixture(scope="session")
def llava_hf_dir(tmp_path_factory):
    """HfPaths of a miniature llava-hf/llava-1.5-7b-hf (real file set, Llama-2 tokenizer) + shapes data."""
    from llava_hf_fixture import build_llava_hf

    return build_llava_hf(tmp_path_factory.mktemp("llava-hf"))


@pytest.fixture(scope="session")
def tiny_next_dir(tmp_path_factory):
    """TinyPaths of a tiny LLaVA-NeXT (llava_next, Mistral text model, anyres tiles); some images
    re-saved at wide and tall aspect ratios so their tile counts differ."""
    from llava_next_fixture import build_tiny_next

    return build_tiny_next(tmp_path_factory.mktemp("tiny-next"))
