"""The training dataset: records kept compact, images and tokens produced only when a sample is drawn.

Every rank (and every data-loader worker) holds the dataset, so holding 665k samples as Python dicts
would cost several GB per process. Records are streamed from the file once and kept as compact JSON
bytes in one buffer with an offset table; a sample is decoded, encoded (`encode.py`) and its image
opened only in `__getitem__`. `lengths`/`is_image` for the sampler are computed during that one pass. Where the family counts
image tokens from the image's size (LLaVA-NeXT's any-resolution tiles), each image's size is read from
its file header in that pass (no decode), so lengths hold the exact image-token count of every sample.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Any

from llava_cluster.data.encode import encode_sample, estimate_length, has_image, sample_id
from llava_cluster.data.images import ImageFolder
from llava_cluster.data.reader import SampleReader
from llava_cluster.data.schema import blocks_encoding, check_sample
from llava_cluster.data.templates import Template
from llava_cluster.errors import UserError

ASPECT_RATIOS = ("pad", "resize")


def pad_to_square(image: Any, colour: tuple[int, int, int]) -> Any:
    """Centre `image` on a square canvas of `colour`, as LLaVA-1.5 does, so the crop keeps the whole image."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor: Any) -> tuple[int, int, int]:
    """The image processor's normalisation mean as an RGB colour: padding that normalises to zero."""
    return tuple(int(round(m * 255)) for m in image_processor.image_mean)


class LazySupervisedDataset:
    """`__getitem__` -> {input_ids, labels, pixel_values and (any-resolution families) image_sizes,
    only for image samples} as torch tensors. Any-resolution images are never padded to a square:
    the tiling keeps their aspect ratio itself, and the token count is that of the image as it is."""

    def __init__(self, data_path: str | Path, image_folder: str | Path | None, processor: Any,
                 template: Template, max_length: int | None, image_aspect_ratio: str = "pad") -> None:
        from llava_cluster.model.family import ImageTokens, family_of_processor

        if image_aspect_ratio not in ASPECT_RATIOS:
            raise UserError(f"image_aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}, not {image_aspect_ratio!r}")
        self.data_path = Path(data_path)
        folder = Path(image_folder) if image_folder else self.data_path.parent
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.family = family_of_processor(processor)
        self.image_aspect_ratio = "resize" if self.family.anyres else image_aspect_ratio
        self.tokens = ImageTokens(processor, self.family)
        self.image_seq_length = self.tokens.square  # of a square image at the model's input side
        self.pad_colour = mean_colour(processor.image_processor)
        self.lengths: list[int] = []
        self.is_image: list[bool] = []
        self.image_counts = array("I")  # image tokens of each sample (0: text-only)
        self._blob = bytearray()
        self._offsets = array("Q", [0])
        headers = ImageFolder(folder) if self.family.anyres and folder.is_dir() else None
        for record in SampleReader(self.data_path):
            if record.error is not None:
                raise UserError(f"{self.data_path}: sample #{record.index} {record.field}: {record.error} "
                                "(run `llava-cluster data check`)")
            blocking = [d for d in check_sample(record.index, record.value) if blocks_encoding(d)]
            if blocking:  # refused now, not as a crash in a loader worker hours into training
                d = blocking[0]
                raise UserError(f"{self.data_path}: sample #{record.index} cannot be encoded: {d.kind} at "
                                f"{d.field}: {d.message} (`llava-cluster data check` lists every defect)")
            try:
                self._blob += json.dumps(record.value, separators=(",", ":"), ensure_ascii=False).encode()
            except RecursionError:
                raise UserError(f"{self.data_path}: sample #{record.index} is nested too deeply "
                                "(run `llava-cluster data check`)") from None
            self._offsets.append(len(self._blob))
            self.is_image.append(has_image(record.value))
            self.image_counts.append(self.tokens.for_sample(record.value, headers) if self.is_image[-1] else 0)
            self.lengths.append(estimate_length(record.value, self.image_counts[-1]))
        if not self.lengths:
            raise UserError(f"{self.data_path} holds no samples")
        self.images = ImageFolder(folder) if any(self.is_image) else None

    def __len__(self) -> int:
        return len(self.lengths)

    def record(self, index: int) -> dict:
        return json.loads(self._blob[self._offsets[index]:self._offsets[index + 1]])

    def load_image(self, sample: dict) -> Any:
        """Open (through `ImageFolder`: contained, regular file, pixel limit), RGB-convert and (for "pad")
        square the sample's image; a refused file is a UserError naming the sample."""
        if self.images is None:
            raise UserError(f"sample {sample_id(sample)}: image {sample.get('image')!r} in a dataset "
                            "without image samples")
        image = self.images.load_for_sample(sample_id(sample), sample["image"])
        return pad_to_square(image, self.pad_colour) if self.image_aspect_ratio == "pad" else image

    def image_inputs(self, image: Any) -> dict[str, Any]:
        """The model's image inputs for one image: pixel_values ([tiles,] 3, H, W), image_sizes if any."""
        pixels = self.processor.image_processor(images=image, return_tensors="pt")
        out = {"pixel_values": pixels["pixel_values"][0]}
        if "image_sizes" in pixels:
            out["image_sizes"] = pixels["image_sizes"][0]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        sample = self.record(index)
        # Any-resolution: the image's size sets its token count, so it is opened before encoding.
        image = self.load_image(sample) if self.family.anyres and has_image(sample) else None
        enc = encode_sample(sample, self.processor.tokenizer, self.template, self.tokens.for_image(image),
                            self.max_length)
        item = {"input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                "labels": torch.tensor(enc.labels, dtype=torch.long)}
        if enc.has_image:
            item.update(self.image_inputs(image if image is not None else self.load_image(sample)))
        return item

    def blank_image_item(self) -> dict[str, Any]:
        """An item of only image tokens (labels ignored) with a blank square image of the processor's
        mean colour: what `ImageInEveryBatch` adds to a text-only micro-batch of a multi-rank run."""
        import torch
        from PIL import Image

        from llava_cluster.data.encode import IGNORE_INDEX, image_token_id

        side = self.processor.image_processor.size
        side = side.get("shortest_edge") or side["height"]
        image = Image.new("RGB", (side, side), self.pad_colour)
        count = self.tokens.for_image(image)
        return {"input_ids": torch.full((count,), image_token_id(self.processor.tokenizer), dtype=torch.long),
                "labels": torch.full((count,), IGNORE_INDEX, dtype=torch.long), **self.image_inputs(image)}
