"""Shared fixtures. The tiny model + data are built once per test session (a few seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """TinyPaths of a 160-sample tiny LLaVA (model/, data/train.json, data/val.json, data/images/)."""
    from llava_cluster.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), samples=160)
