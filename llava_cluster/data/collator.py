"""Batch dataset items: right-pad tokens, and stack images only for the samples that have one.

`LlavaForConditionalGeneration` pairs image-token runs in `input_ids` with `pixel_values` rows in
order, so `pixel_values` holds exactly the image samples of the batch, in batch order, and is absent
when the batch is text-only (the model then skips the vision tower).
"""

from __future__ import annotations

from typing import Any

from llava_cluster.data.encode import IGNORE_INDEX


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
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
        return batch
