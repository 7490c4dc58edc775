"""`llava-cluster train SPEC`: only the train stage, on this machine (torchrun for several ranks).

It is `submit` restricted to the train stage on the local backend: the same checks, the same frozen
spec and run directory, so a later `submit` of that spec goes on with merge and validate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llava_cluster.submit import submit


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  llava-cluster train jobs/tiny-local.yaml\n"
        "  llava-cluster train my-run.yaml resources.gpus_per_node=4 optim.max_steps=100\n\n"
        "The run directory is <storage>/runs/<name>; run it again to resume from the last checkpoint.\n"
    )
    parser.add_argument("spec", type=Path, help="run spec YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--dry-run", action="store_true", help="print the command; change nothing")
    parser.set_defaults(func=lambda a: submit(a.spec, a.overrides, "local", a.dry_run, only=("train",)))
