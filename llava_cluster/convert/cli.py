"""`llava-cluster convert`: bring original-repo (haotian-liu/LLaVA) checkpoints and LoRA outputs in once."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EPILOG = """\
examples:
  # LLaVA-1.5 release (pickled .bin weights) + the CLIP tower it names, downloaded beforehand:
  llava-cluster convert original ./llava-v1.5-7b --vision-tower ./clip-vit-large-patch14-336 \\
      --out ./llava-1.5-7b-hf --allow-pickle

  # a LoRA output of the original training scripts, onto that converted base:
  llava-cluster convert adapter ./llava-v1.5-7b-lora --base ./llava-1.5-7b-hf --out ./adapter --allow-pickle
  llava-cluster merge --adapter ./adapter --out ./merged

Pickles (*.bin) are read only with --allow-pickle, and then with torch.load(weights_only=True),
which refuses anything but tensors. Everything written is safetensors.
"""


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert original-layout LLaVA checkpoints (haotian-liu/LLaVA) to Hugging Face native LLaVA, "
        "and original LoRA outputs (adapter + non_lora_trainables.bin) to llava-cluster's adapter layout."
    )
    parser.epilog = EPILOG
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)

    orig = sub.add_parser(
        "original", help="an original LLaVA-1.5 checkpoint -> LlavaForConditionalGeneration + processor",
        description="Rename the weights, take the vision tower from a local CLIP folder, add <image> and "
                    "<pad> tokens, pad the vocabulary (new embedding rows = mean of the existing rows) and "
                    "write the processor.",
    )
    orig.add_argument("src", type=Path, help="original checkpoint folder (config.json with mm_vision_tower)")
    orig.add_argument("--vision-tower", type=Path, required=True,
                      help="local CLIP folder named by mm_vision_tower (e.g. clip-vit-large-patch14-336)")
    orig.add_argument("--out", type=Path, required=True, help="folder to write (replaced atomically)")
    orig.add_argument("--pad-vocab-to", type=int, default=64,
                      help="round the vocabulary up to a multiple of this (default 64; 1 = no padding)")
    orig.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                      help="weights dtype to write (default: the checkpoint's)")
    orig.add_argument("--allow-pickle", action="store_true", help="read *.bin weights (tensors only)")
    orig.add_argument("--json", action="store_true", help="print the conversion report as JSON")
    orig.set_defaults(func=run_original)

    adapter = sub.add_parser(
        "adapter", help="an original LoRA output -> adapter_model.safetensors + non_lora_trainables.safetensors",
        description="Rename LoRA and projector tensors to the HF LLaVA names, anchor target_modules to the "
                    "language model, check every tensor against the converted base and record it.",
    )
    adapter.add_argument("src", type=Path, help="folder with adapter_config.json, adapter_model.*, non_lora_trainables.bin")
    adapter.add_argument("--base", type=Path, required=True, help="the base, converted with `convert original`")
    adapter.add_argument("--out", type=Path, required=True, help="adapter folder to write (replaced atomically)")
    adapter.add_argument("--template", default="vicuna_v1", help="conversation template it was trained with")
    adapter.add_argument("--allow-pickle", action="store_true", help="read *.bin files (tensors only)")
    adapter.add_argument("--json", action="store_true", help="print the conversion report as JSON")
    adapter.set_defaults(func=run_adapter)


def _show(report: dict, as_json: bool, title: str) -> None:
    from llava_cluster.console import console

    if as_json:
        console.print_json(json.dumps(report))
        return
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in report.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


def run_original(args: argparse.Namespace) -> int:
    from llava_cluster.convert.original import convert_original
    from llava_cluster.errors import UserError

    if args.pad_vocab_to < 1:
        raise UserError(f"--pad-vocab-to must be >= 1, got {args.pad_vocab_to}")
    report = convert_original(args.src, args.vision_tower, args.out, allow_pickle=args.allow_pickle,
                              pad_to=args.pad_vocab_to, dtype=args.dtype)
    _show(report, args.json, f"converted {args.src} -> {args.out}")
    return 0


def run_adapter(args: argparse.Namespace) -> int:
    from llava_cluster.convert.adapter import convert_adapter

    report = convert_adapter(args.src, args.base, args.out, allow_pickle=args.allow_pickle, template=args.template)
    _show(report, args.json, f"converted adapter {args.src} -> {args.out}")
    return 0
