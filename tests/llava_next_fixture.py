"""A tiny LLaVA-NeXT base (llava_cluster.tiny.build, family llava_next) whose first images have
several aspect ratios, so that their any-resolution tile counts (3, 4 and 5 here) differ."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from llava_cluster.tiny.build import TinyPaths, build_tiny

# (width, height): square -> 1x2 grid + base = 3 tiles, very wide -> 1x3 + base = 4, ~square bigger -> 2x2 + base = 5
ASPECTS = ((32, 32), (96, 20), (20, 96), (50, 40), (64, 30))


def build_tiny_next(out: Path, samples: int = 96) -> TinyPaths:
    paths = build_tiny(out, samples=samples, family="llava_next")
    for data in (paths.train, paths.val):
        records = json.loads(data.read_text())
        image_samples = [r for r in records if r.get("image")]
        for record, size in zip(image_samples, ASPECTS, strict=False):
            path = paths.images / record["image"]
            with Image.open(path) as img:
                img.convert("RGB").resize(size).save(path)
    return paths
