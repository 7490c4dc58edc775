"""A fixed probe batch (one image prompt, one text-only prompt) for comparing two models' logits."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from llava_cluster.data.templates import IMAGE_TOKEN, get_template


def probe_inputs(processor: Any, template: str = "vicuna_v1") -> dict[str, Any]:
    size = processor.image_processor.crop_size.get("height", 32) if hasattr(processor.image_processor, "crop_size") else 32
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // max(size - 1, 1), y * 255 // max(size - 1, 1), (x + y) % 256], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8))
    tmpl = get_template(template)
    prompts = [
        tmpl.prompt([("user", f"{IMAGE_TOKEN}\nWhat colour is the shape?")]),
        tmpl.prompt([("user", "Say the word after: apple")]),
    ]
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = processor(text=prompts, images=[image], padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return dict(batch)
