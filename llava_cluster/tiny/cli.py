"""`llava-cluster tiny`: write a tiny random LLaVA and its synthetic dataset, for demos and tests."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EPILOG = """\
examples:
  llava-cluster tiny --out .demo/tiny                 model in .demo/tiny/model, data in .demo/tiny/data
  llava-cluster tiny --out /tmp/t --samples 160 --seed 1 --json
  llava-cluster tiny --out /scratch/llava-7b-random --shape 7b --device cuda --dtype bf16   # GPU smoke runs
  llava-cluster tiny --out /tmp/next --family llava_next     # LLaVA-NeXT: anyres tiles, Mistral-style LM

The model is a random-weight LlavaForConditionalGeneration (CLIP-style vision tower, Llama-style LM,
16 image tokens per image, a byte-level BPE tokenizer trained here): no download. The data asks the
colour or the shape of one drawn object (one-word answers), with some two-question and some
text-only samples; a LoRA fine-tune learns it in a few hundred CPU steps.
`--shape 7b` writes the same with LLaVA-1.5-7B's sizes (576 image tokens, 14 GB in bf16): a random
base to try a cluster's GPUs, drivers and storage with the real memory and time, before any download.
`--family llava_next` writes a LlavaNextForConditionalGeneration instead (llava-v1.6-mistral's config
fields: any-resolution tiles from image_grid_pinpoints, image_newline, a Mistral text model); a spec
without `model.template` trains it with its family's `mistral_instruct`.
"""


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--out", type=Path, required=True, help="folder to write model/ and data/ into")
    parser.add_argument("--samples", type=int, default=600, help="number of samples, train + val (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same model and data (default 0)")
    parser.add_argument("--shape", choices=("tiny", "7b"), default="tiny", help="model sizes (default tiny)")
    parser.add_argument("--device", default="cpu", help="where the random weights are made (cuda for --shape 7b)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="stored weights")
    parser.add_argument("--family", choices=("llava", "llava_next"), default="llava",
                        help="model family (default llava, LLaVA-1.5)")
    parser.add_argument("--json", action="store_true", help="print the written paths as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llava_cluster.errors import UserError

    if args.samples < 2:
        raise UserError(f"--samples must be at least 2 (one train, one val), got {args.samples}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} exists and is not a folder")

    from llava_cluster.console import console, err_console

    start = time.time()
    with err_console.status(f"building {args.shape} LLaVA + {args.samples} samples in {args.out} ..."):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        from llava_cluster.tiny.build import build_tiny

        paths = build_tiny(args.out, samples=args.samples, seed=args.seed, shape=args.shape, device=args.device,
                           dtype=args.dtype, family=args.family)
    summary = _summary(paths)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"{args.shape} LLaVA written in {time.time() - start:.1f} s", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)
    return 0


def _summary(paths) -> dict:
    train = json.loads(paths.train.read_text())
    val = json.loads(paths.val.read_text())
    config = json.loads((paths.model / "config.json").read_text())
    every = train + val
    return {
        "model": str(paths.model),
        "train": str(paths.train),
        "val": str(paths.val),
        "images": str(paths.images),
        "train_samples": len(train),
        "val_samples": len(val),
        "text_only": sum("image" not in r for r in every),
        "multi_turn": sum(len(r["conversations"]) > 2 for r in every),
        "family": config["model_type"],
        "image_seq_length": config["image_seq_length"],
        "vocab_size": config["text_config"]["vocab_size"],
    }
