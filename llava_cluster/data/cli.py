"""`llava-cluster data check | stats | convert | preview`: wiring only; the work lives in sibling modules.

Every subcommand's arguments are declared here and its handler imports the module doing the work only
when it runs, so `llava-cluster data --help` (and each subcommand's) stays fast: no torch, no processor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llava_cluster.data.images import MAX_PIXELS
from llava_cluster.data.templates import TEMPLATES
from llava_cluster.errors import UserError

CHECK_EPILOG = """\
exit codes: 0 clean, 1 defects found, 2 unusable input (missing file, not JSON, not a list)

examples:
  llava-cluster data check llava_v1_5_mix665k.json --image-folder /data/llava/images
  llava-cluster data check train.jsonl --image-folder imgs/ --model /models/llava-1.5-7b-hf --max-length 2048
  llava-cluster data check train.json --json > defects.json      every defect, machine-readable
  llava-cluster data check train.json                             structure only, image files not opened
"""

STATS_EPILOG = """\
examples:
  llava-cluster data stats train.json --image-folder images/
  llava-cluster data stats train.json --image-folder images/ --model /models/llava-1.5-7b-hf --json
  llava-cluster data stats train.json --image-folder images/ --image-sample 0    read every image header
"""

CONVERT_EPILOG = """\
formats:
  csv       header image,question,answer (optional id); empty image = text-only sample
  jsonl     .jsonl or .json list of {"image", "question", "answer", "id"?} rows
  messages  OpenAI/HF chat records: {"messages": [{"role": "user", "content": [{"type": "image",
            "image": "a.jpg"}, {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]}
            (images may also come from a top-level "images" list; system messages are dropped)

Ids are kept when given, otherwise derived from the content, so converting again gives the same ids.
A bad row stops the conversion (exit 1, nothing written) unless --skip-bad.

examples:
  llava-cluster data convert qa.csv --format csv --out train.json
  llava-cluster data convert chats.jsonl --format messages --out train.json --skip-bad
"""

PREVIEW_EPILOG = """\
examples:
  llava-cluster data preview train.json --model /models/llava-1.5-7b-hf --index 0
  llava-cluster data preview train.jsonl --model tiny/model --index 12 --template chatml
  llava-cluster data preview train.json --model tiny/model --index 3 --json | jq '.labels'
"""


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: _missing_subcommand(parser))
    fmt = argparse.RawDescriptionHelpFormatter

    check = sub.add_parser("check", help="report every defect of a dataset (exit 1 if any)", epilog=CHECK_EPILOG,
                           formatter_class=fmt, description=(
                               "Read every sample of a LLaVA .json/.jsonl file and report every defect, each "
                               "with sample index, id and field: JSON syntax, ids, roles, turn order, <image> "
                               "placement, text that is not Unicode, image files (missing, empty, corrupt, outside "
                               f"the folder after resolving symlinks, not a regular file, over {MAX_PIXELS // 10**6} "
                               "megapixels) and, "
                               "with --model, samples that --max-length would truncate. Streams: memory stays flat."))
    _data_args(check)
    check.add_argument("--max-length", type=int, default=None, metavar="N",
                       help="token limit of training (default 2048); needs --model")
    check.add_argument("--show", type=int, default=20, metavar="N",
                       help="print at most N defects of each kind (default 20; --json lists all)")
    check.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                       help="threads that open and decode images (default: CPUs, at most 8; 1.9x faster with 2 "
                            "on 640x480 JPEGs, slower on thumbnails, where 1 is best)")
    check.set_defaults(func=_check)

    stats = sub.add_parser("stats", help="counts, modality mix, image sizes, token-length percentiles",
                           epilog=STATS_EPILOG, formatter_class=fmt, description=(
                               "Summarise a LLaVA dataset: samples, turns per sample, image/text-only mix, image "
                               "size distribution (from file headers, no decode) and, with --model, token-length "
                               "percentiles after image expansion: what --max-length to choose."))
    _data_args(stats)
    stats.add_argument("--image-sample", type=int, default=2000, metavar="N",
                       help="read the headers of N distinct images picked at random (default 2000; 0 = all)")
    stats.set_defaults(func=_stats)

    convert = sub.add_parser("convert", help="turn CSV / QA rows / chat 'messages' into LLaVA JSON",
                             epilog=CONVERT_EPILOG, formatter_class=fmt,
                             description="Convert question/answer rows or OpenAI/HF chat records into LLaVA JSON.")
    convert.add_argument("src", metavar="SRC", help="input file (.csv, .json or .jsonl)")
    convert.add_argument("--format", required=True, choices=("csv", "jsonl", "messages"), help="input format")
    convert.add_argument("--out", required=True, metavar="DATA.json", help="LLaVA JSON to write (atomically)")
    convert.add_argument("--skip-bad", action="store_true", help="skip bad rows (reported) instead of failing")
    convert.add_argument("--json", action="store_true", help="print the result as one JSON object")
    convert.set_defaults(func=_convert)

    preview = sub.add_parser("preview", help="show how samples are rendered, tokenized and masked",
                             epilog=PREVIEW_EPILOG, formatter_class=fmt, description=(
                                 "Render one sample with a conversation template, tokenize it with the model's "
                                 "tokenizer and show which tokens are supervised (green) — the exact input_ids "
                                 "and labels training uses, after <image> expansion and --max-length truncation."))
    preview.add_argument("data", metavar="DATA", help="LLaVA data file: .json (a list) or .jsonl")
    preview.add_argument("--model", metavar="MODEL_DIR", required=True,
                         help="HF LLaVA model folder (its tokenizer and processor are used)")
    preview.add_argument("--index", type=int, default=0, help="position of the sample in the file (default 0)")
    preview.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                         help="conversation template (default: the model family's, see `data check --help`)")
    preview.add_argument("--image-folder", metavar="DIR", default=None,
                         help="folder the `image` paths are relative to (default: the data file's); "
                              "any-resolution models (LLaVA-NeXT) count image tokens from the image's size")
    preview.add_argument("--max-length", type=int, default=2048, metavar="N",
                         help="truncate as training would (default 2048)")
    preview.add_argument("--json", action="store_true",
                         help="print {id, text, input_ids, labels, ...} instead of the highlighted text")
    preview.set_defaults(func=_preview)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="LLaVA data file: .json (a list) or .jsonl (one sample a line)")
    p.add_argument("--image-folder", metavar="DIR", help="folder the `image` paths are relative to")
    p.add_argument("--model", metavar="MODEL_DIR", help="HF LLaVA model folder, for token lengths")
    p.add_argument("--template", default=None, choices=sorted(TEMPLATES),
                   help="conversation template used for token counts (default: the model family's, "
                        "vicuna_v1 for LLaVA-1.5, mistral_instruct for LLaVA-NeXT on Mistral)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _check(args: argparse.Namespace) -> int:
    from llava_cluster.console import err_console
    from llava_cluster.data.check import DEFAULT_MAX_LENGTH, check_file, render

    if args.max_length is not None and not args.model:
        raise UserError("--max-length needs --model (token lengths depend on the tokenizer)", 2)
    if args.max_length is not None and args.max_length < 1:
        raise UserError(f"--max-length must be positive, got {args.max_length}", 2)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}", 2)
    report = check_file(args.data, args.image_folder, args.model, args.max_length or DEFAULT_MAX_LENGTH,
                        args.template, progress=err_console.is_terminal, workers=args.workers)
    if args.json:
        _print_json(report.to_json())
    else:
        render(report, cap=max(args.show, 0))
    return 1 if report.defects else 0


def _stats(args: argparse.Namespace) -> int:
    from llava_cluster.data.stats import compute_stats, render

    if args.image_sample < 0:
        raise UserError(f"--image-sample must be 0 (all) or positive, got {args.image_sample}", 2)
    stats = compute_stats(args.data, args.image_folder, args.model, args.template, args.image_sample)
    if args.json:
        _print_json(stats)
    else:
        render(stats)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from llava_cluster.data.convert import convert_file, render

    result = convert_file(args.src, args.format, args.out, skip_bad=args.skip_bad)
    if args.json:
        _print_json(result.to_json())
    else:
        render(result)
    return 1 if result.problems and not args.skip_bad else 0


def _preview(args: argparse.Namespace) -> int:
    from llava_cluster.data.preview import run

    return run(args)
