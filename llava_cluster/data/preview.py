"""`llava-cluster data preview`: one sample exactly as training sees it, supervised tokens highlighted.

The display is built from the encoded tokens (after image expansion and truncation), not from the
template's text, so what is green is precisely what carries labels. "Loss is 0" and "the model
learnt the prompt" bugs are visible here before any GPU time is spent. The command's arguments are
declared in `data/cli.py`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llava_cluster.errors import UserError

STYLES = {"prompt": "", "reply": "bold green", "image": "magenta"}


def read_sample(path: str, index: int) -> dict:
    """The index-th sample of a .json/.jsonl file, streamed (no full load of a large file)."""
    from llava_cluster.data.reader import SampleReader
    from llava_cluster.data.schema import blocks_encoding, check_sample

    if index < 0:
        raise UserError(f"--index must be >= 0, not {index}")
    count = 0
    for record in SampleReader(path):
        if record.index == index:
            if record.error is not None:
                what = "is not valid JSON" if record.kind == "invalid_json" else f"has bad text in {record.field}"
                raise UserError(f"{path}: sample #{index} {what}: {record.error}")
            blocking = [d for d in check_sample(index, record.value) if blocks_encoding(d)]
            if blocking:
                d = blocking[0]
                raise UserError(f"{path}: sample #{index} cannot be encoded: {d.kind} at {d.field}: {d.message}"
                                f" (`llava-cluster data check {path}` lists every defect)")
            return record.value
        count = record.index + 1
    raise UserError(f"--index {index} is out of range: {path} holds {count} samples (0..{count - 1})")


def segments(input_ids: list[int], labels: list[int], image_id: int | None) -> list[tuple[str, list[int]]]:
    """Runs of prompt / reply / image tokens, in order."""
    out: list[tuple[str, list[int]]] = []
    for token, label in zip(input_ids, labels, strict=True):
        kind = "image" if token == image_id else ("reply" if label != -100 else "prompt")
        if out and out[-1][0] == kind:
            out[-1][1].append(token)
        else:
            out.append((kind, [token]))
    return out


def segment_texts(segs: list[tuple[str, list[int]]], tokenizer: Any) -> list[tuple[str, str]]:
    """Decode each run as part of the whole, so word-boundary spaces land where the tokenizer puts them."""
    out, ids, before = [], [], ""
    for kind, tokens in segs:
        if kind == "image":
            out.append((kind, f"<image>×{len(tokens)}"))
            ids.append(tokens[0])
            before = tokenizer.decode(ids)
            continue
        ids += tokens
        whole = tokenizer.decode(ids)
        text = whole[len(before):] if whole.startswith(before) else tokenizer.decode(tokens)
        out.append((kind, text))
        before = whole
    return out


def run(args: argparse.Namespace) -> int:
    from llava_cluster.data.encode import conversation_turns, encode_sample, image_token_id
    from llava_cluster.data.images import ImageFolder
    from llava_cluster.data.templates import get_template
    from llava_cluster.model.load import image_tokens, load_processor, template_for

    args.template = template_for(args.model, args.template)
    template = get_template(args.template)
    sample = read_sample(args.data, args.index)
    processor = load_processor(args.model)
    tokenizer = processor.tokenizer
    folder = Path(args.image_folder) if args.image_folder else Path(args.data).parent
    images = ImageFolder(folder) if sample.get("image") and folder.is_dir() else None
    count = image_tokens(processor, args.model).for_sample(sample, images)
    enc = encode_sample(sample, tokenizer, template, count, args.max_length)
    text = template.render(conversation_turns(sample)).text
    if args.json:
        print(json.dumps({
            "id": sample.get("id"), "index": args.index, "template": template.name, "text": text,
            "input_ids": enc.input_ids, "labels": enc.labels, "has_image": enc.has_image,
            "full_length": enc.full_length, "lost_tokens": enc.lost_tokens, "dropped_rounds": enc.dropped_rounds,
        }))
        return 0
    _show(sample, args, enc, segment_texts(segments(enc.input_ids, enc.labels, image_token_id(tokenizer)), tokenizer))
    return 0


def _show(sample: dict, args: argparse.Namespace, enc: Any, parts: list[tuple[str, str]]) -> None:
    from rich.panel import Panel
    from rich.text import Text

    from llava_cluster.console import console

    body = Text()
    for kind, text in parts:
        body.append(text, style=STYLES[kind])
    supervised = sum(1 for label in enc.labels if label != -100)
    title = f"sample {sample.get('id', '?')} (#{args.index}) · {args.template}"
    summary = (f"{len(enc.input_ids)} tokens, {supervised} supervised"
               f"{', image' if enc.has_image else ', text-only'}")
    console.print(Panel(body, title=title, subtitle=summary, title_align="left", subtitle_align="left"))
    console.print(Text.assemble(("prompt (no labels)", STYLES["prompt"] or "default"), "  ",
                                ("reply (supervised)", STYLES["reply"]), "  ", ("<image>×N", STYLES["image"])))
    if enc.lost_tokens:
        console.print(f"[yellow]truncated at --max-length {args.max_length}: {enc.lost_tokens} of "
                      f"{enc.full_length} tokens and {enc.dropped_rounds} round(s) dropped[/]")
    if supervised == 0:
        console.print("[bold red]no supervised tokens: this sample trains nothing[/]")
