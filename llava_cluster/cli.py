"""The `llava-cluster` command. Each subcommand lives in its own module and registers itself.

Modules are imported only for the subcommand being run, so `--help` stays fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from llava_cluster import __version__
from llava_cluster.errors import UserError
from llava_cluster.noise import VERBOSE_ENV, quiet

# (command, module, one-line help). Every module defines `register(parser)`, which adds the command's
# arguments (a command group: its subcommands, each with its arguments) and sets `func=handler`; a
# handler takes the parsed args, imports what does the work and returns an exit code. The module is the
# one doing the work, or a group's `cli.py`.
COMMANDS: list[tuple[str, str, str]] = [
    ("data", "llava_cluster.data.cli", "check, convert, summarise and preview LLaVA conversation data"),
    ("tiny", "llava_cluster.tiny.cli", "write a tiny random LLaVA model and a learnable synthetic dataset"),
    ("submit", "llava_cluster.submit", "run a spec's stages (train -> merge -> validate) locally, on SLURM or on k8s"),
    ("status", "llava_cluster.status", "show a run's stages: state, job ids, attempts, elapsed, failing log tail"),
    ("train", "llava_cluster.train_local", "train a spec on this machine (no merge/validate); re-run to resume"),
    ("merge", "llava_cluster.merge.run", "fold an adapter + projector into the base: a standard HF checkpoint"),
    ("validate", "llava_cluster.validate.run", "generate on held-out samples, score against references and the base"),
    ("demo", "llava_cluster.demo", "the whole pipeline on a tiny model, on this machine, in a few minutes"),
    ("stage", "llava_cluster.stage", "run one stage (train, merge, validate) of a run directory: what every job runs"),
    ("logs", "llava_cluster.logs", "print or follow a stage's log (--follow), or its SLURM job's console output"),
    ("convert", "llava_cluster.convert.cli", "convert original-layout LLaVA checkpoints and LoRA outputs to HF LLaVA"),
    ("plan", "llava_cluster.plan", "estimate per-GPU memory of a spec, the verdict for its GPUs and the largest batch"),
]

EPILOG = """\
typical flow:
  llava-cluster data check data.json --image-folder images/      find every defect before a GPU hour is spent
  llava-cluster submit jobs/my-run.yaml --backend slurm          train -> merge -> validate, chained
  llava-cluster status /shared/runs/my-run                       where is it, what failed and why
"""


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-cluster",
        description="Fine-tune LLaVA vision-language models with LoRA/QLoRA on SLURM or Kubernetes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llava-cluster {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' own messages (DeepSpeed, torchrun, bitsandbytes, transformers)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, module, help_text in COMMANDS:
        cmd = sub.add_parser(name, help=help_text, description=help_text,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == wanted:
            importlib.import_module(module).register(cmd)
    return parser


def _is_override(arg: str) -> bool:
    key, sep, _ = arg.partition("=")
    return bool(sep) and bool(key) and not arg.startswith("-")


def parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line as `main` reads it; a mistake exits 2 with argparse's message."""
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may follow the options: `submit SPEC --backend slurm optim.lr=1e-4`
        if isinstance(getattr(args, "overrides", None), list) and all(_is_override(a) for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.parse_args(argv)  # argparse's own message for what is really unknown
    return parser, args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, args = parse(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the stages' child processes inherit it
    quiet()
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        from llava_cluster.console import print_message

        print_message("error", "bold red", err.message)
        return err.exit_code
    except KeyboardInterrupt:
        from llava_cluster.launch.interrupt import ABORTED_EXIT

        return ABORTED_EXIT
    except BrokenPipeError:  # `llava-cluster ... --json | head`
        sys.stderr.close()
        return 141
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
