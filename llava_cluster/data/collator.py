"""Batch dataset items: right-pad tokens, and stack images only for the samples that have one.

`LlavaForConditionalGeneration` pairs image-token runs in `input_ids` with `pixel_values` rows in
order, so `pixel_values` holds exactly the image samples of the batch, in batch order, and is absent
when the batch is text-only (the model then skips the vision tower). Any-resolution families
(LLaVA-NeXT) give each image its own number of tiles: `pixel_values` is then (images, most tiles, 3, H, W),
zero tiles at the tail of the shorter ones, and `image_sizes` (images, 2) tells the model how many
tiles of each row are real (`image_size_to_num_patches`), so the padding is never looked at.
"""

from __future__ import annotations

from typing import Any

from llava_cluster.data.encode import IGNORE_INDEX


def image_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """pixel_values (and image_sizes) of the items that have an image, in order; {} when none has."""
    import torch

    pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
    if not pixels:
        return {}
    if "image_sizes" not in next(item for item in items if "pixel_values" in item):
        return {"pixel_values": torch.stack(pixels)}
    tiles = max(p.shape[0] for p in pixels)
    padded = torch.zeros((len(pixels), tiles, *pixels[0].shape[1:]), dtype=pixels[0].dtype)
    for k, p in enumerate(pixels):
        padded[k, :p.shape[0]] = p
    sizes = torch.stack([item["image_sizes"] for item in items if "pixel_values" in item])
    return {"pixel_values": padded, "image_sizes": sizes}


class LlavaCollator:
    def __init__(self, pad_token_id: int | None) -> None:
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; LLaVA processors define one (<pad>)")
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, **image_batch(items)}
