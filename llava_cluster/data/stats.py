"""`data stats`: the numbers to size a run by — modality mix, turns, image sizes and token lengths.

Token lengths are what `--max-length` must be chosen from, and they only mean something after the
image is expanded to the model's image tokens, so they need `--model`. Image sizes come from file
headers (Pillow reads the size without decoding pixels); by default from a random sample of distinct
images, which the output says.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from pathlib import Path
from typing import Any

from llava_cluster.data.images import ImageFolder, ImageProblem
from llava_cluster.data.reader import SampleReader
from llava_cluster.data.schema import blocks_encoding, check_sample
from llava_cluster.errors import UserError

SIDE_BUCKETS = (336, 672, 1344)
TOKEN_LIMITS = (512, 1024, 2048, 4096)


def percentiles(values: list[int]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 plus min, max and mean; an empty list gives {}."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]

    return {"min": ordered[0], "p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1],
            "mean": round(sum(ordered) / len(ordered), 2)}


def compute_stats(
    path: str | Path,
    image_folder: str | Path | None = None,
    model: str | Path | None = None,
    template: str | None = None,
    image_sample: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """One pass over the file; samples with structural defects are counted as `malformed`, not measured."""
    reader = SampleReader(path)
    images = ImageFolder(image_folder) if image_folder is not None else None
    encoder = _Encoder(model, template, images) if model is not None else None
    samples = malformed = with_image = text_only = 0
    turns: list[int] = []
    image_paths: set[str] = set()
    lengths: dict[str, list[int]] = {"image": [], "text_only": []}
    for record in reader:
        samples += 1
        sample = record.value
        if record.error is not None or any(blocks_encoding(d) for d in check_sample(record.index, sample)):
            malformed += 1
            continue
        turns.append(len(sample["conversations"]))
        if sample.get("image") is not None:
            with_image += 1
            image_paths.add(sample["image"])
        else:
            text_only += 1
        if encoder is not None:
            lengths["image" if sample.get("image") is not None else "text_only"].append(encoder.length(sample))
    stats: dict[str, Any] = {
        "file": str(path),
        "samples": samples,
        "malformed": malformed,
        "modality": {"image": with_image, "text_only": text_only},
        "distinct_images": len(image_paths),
        "turns": {"total": sum(turns), "per_sample": percentiles(turns)},
        "images": _image_sizes(image_paths, images, image_sample, seed) if images is not None else None,
        "tokens": None,
    }
    if encoder is not None:
        everything = lengths["image"] + lengths["text_only"]
        stats["tokens"] = {
            "template": encoder.template.name, "image_seq_length": encoder.image_tokens,
            "image_tokens_per_image": encoder.counter.anyres,
            "all": percentiles(everything), "image": percentiles(lengths["image"]),
            "text_only": percentiles(lengths["text_only"]),
            "over": {str(limit): sum(n > limit for n in everything) for limit in TOKEN_LIMITS},
        }
    return stats


class _Encoder:
    """Full (untruncated) token length of a sample exactly as training encodes it."""

    def __init__(self, model: str | Path, template: str | None, images: ImageFolder | None) -> None:
        from llava_cluster.data.encode import encode_sample
        from llava_cluster.data.templates import get_template
        from llava_cluster.model.load import image_tokens, load_processor, template_for

        if not Path(model).exists():
            raise UserError(f"model folder not found: {model}", 2)
        self.template = get_template(template_for(model, template))
        processor = load_processor(model)
        self.counter, self.images = image_tokens(processor, model), images  # per image for any-resolution
        self.tokenizer, self.image_tokens, self.encode = processor.tokenizer, self.counter.square, encode_sample

    def length(self, sample: dict[str, Any]) -> int:
        image = self.counter.for_sample(sample, self.images) if sample.get("image") else 0
        return self.encode(sample, self.tokenizer, self.template, image, None).full_length


def _image_sizes(paths: set[str], folder: ImageFolder, sample: int, seed: int) -> dict[str, Any]:
    chosen = sorted(paths)
    if sample and len(chosen) > sample:
        chosen = random.Random(seed).sample(chosen, sample)
        method = f"random sample of {sample} distinct images (seed {seed})"
    else:
        method = f"all {len(chosen)} distinct images"
    widths: list[int] = []
    heights: list[int] = []
    unreadable = 0
    for rel in chosen:
        try:
            width, height = folder.size(rel)
        except ImageProblem:  # `data check` says which and why
            unreadable += 1
            continue
        widths.append(width)
        heights.append(height)
    labels = ([f"<={SIDE_BUCKETS[0]}"] + [f"{lo + 1}-{hi}" for lo, hi in itertools.pairwise(SIDE_BUCKETS)]
              + [f">{SIDE_BUCKETS[-1]}"])
    buckets = dict.fromkeys(labels, 0)
    for width, height in zip(widths, heights, strict=True):
        buckets[labels[bisect.bisect_left(SIDE_BUCKETS, max(width, height))]] += 1
    return {
        "method": method,
        "measured": len(widths),
        "unreadable": unreadable,
        "width": percentiles(widths),
        "height": percentiles(heights),
        "longest_side": buckets,
        "orientation": {
            "landscape": sum(w > h for w, h in zip(widths, heights, strict=True)),
            "portrait": sum(w < h for w, h in zip(widths, heights, strict=True)),
            "square": sum(w == h for w, h in zip(widths, heights, strict=True)),
        },
    }


def render(stats: dict[str, Any]) -> None:
    from rich.table import Table

    from llava_cluster.console import console

    table = Table(title=f"data stats: {stats['file']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("samples", f"{stats['samples']:,}")
    if stats["malformed"]:
        table.add_row("malformed (not measured; run data check)", f"[red]{stats['malformed']:,}")
    table.add_row("with image", f"{stats['modality']['image']:,}")
    table.add_row("text-only", f"{stats['modality']['text_only']:,}")
    table.add_row("distinct images", f"{stats['distinct_images']:,}")
    table.add_row("turns", f"{stats['turns']['total']:,}")
    console.print(table)

    dist = Table(title="distributions", title_justify="left")
    for col in ("", "min", "p50", "p90", "p99", "max", "mean"):
        dist.add_column(col, justify="left" if not col else "right")

    def row(name: str, p: dict[str, float]) -> None:
        if p:
            dist.add_row(name, *(f"{p[k]:,}" for k in ("min", "p50", "p90", "p99", "max", "mean")))

    row("turns per sample", stats["turns"]["per_sample"])
    if stats["images"]:
        row("image width (px)", stats["images"]["width"])
        row("image height (px)", stats["images"]["height"])
    if stats["tokens"]:
        row("tokens, all samples", stats["tokens"]["all"])
        row("tokens, image samples", stats["tokens"]["image"])
        row("tokens, text-only", stats["tokens"]["text_only"])
    console.print(dist)
    if stats["images"]:
        img = stats["images"]
        sides = ", ".join(f"{k}: {v:,}" for k, v in img["longest_side"].items())
        shape = ", ".join(f"{k} {v:,}" for k, v in img["orientation"].items())
        console.print(f"images: {img['method']}; {img['measured']:,} measured, {img['unreadable']:,} unreadable",
                      highlight=False)
        console.print(f"  longest side (px): {sides}; {shape}", highlight=False)
    else:
        console.print("images: not measured (no --image-folder)", highlight=False)
    if stats["tokens"]:
        tok = stats["tokens"]
        over = ", ".join(f"> {k}: {v:,}" for k, v in tok["over"].items())
        image = (f"image = by size, {tok['image_seq_length']} for a square one" if tok.get("image_tokens_per_image")
                 else f"image = {tok['image_seq_length']} tokens")
        console.print(f"tokens ({tok['template']}, {image}): samples {over}",
                      highlight=False)
    else:
        console.print("tokens: not counted (pass --model)", highlight=False)
