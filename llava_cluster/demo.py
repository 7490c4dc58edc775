"""`llava-cluster demo`: the whole product on this machine in a few minutes — a tiny LLaVA and a
learnable synthetic task, then jobs/tiny-local.yaml through the local backend (train under
DeepSpeed ZeRO-3 with 2 CPU ranks -> verified merge -> validation report against the base)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llava_cluster.console import console
from llava_cluster.errors import UserError
from llava_cluster.rundir import PREEMPTED_EXIT

SPEC = Path(__file__).resolve().parents[1] / "jobs" / "tiny-local.yaml"


def run_demo(workdir: Path, samples: int) -> int:
    from llava_cluster.submit import submit
    from llava_cluster.tiny.build import build_tiny

    if not SPEC.is_file():
        raise UserError(f"{SPEC} not found: run the demo from a source checkout of llava-cluster")
    started = time.time()
    workdir = workdir.resolve()
    tiny_root = workdir / "tiny"
    if not (tiny_root / "model" / "config.json").is_file():
        from transformers.utils import logging as hf_logging

        console.print(f"building the tiny model and dataset in {tiny_root}")
        hf_logging.disable_progress_bar()  # a shard bar for a 2 MB model says nothing
        build_tiny(tiny_root, samples=samples)
    paths = tiny_root / "data"
    overrides = [f"storage={workdir}", f"model.base={tiny_root / 'model'}", f"data.train={paths / 'train.json'}",
                 f"data.eval={paths / 'val.json'}", f"data.image_folder={paths / 'images'}"]
    code = submit(SPEC, overrides, backend="local", dry_run=False)
    run = workdir / "runs" / "tiny-local"
    if code == PREEMPTED_EXIT:
        console.print(f"[yellow]demo interrupted[/]: run it again (make demo) to resume from its checkpoint; "
                      f"llava-cluster status {run}", highlight=False)
        return code
    if code != 0:
        console.print(f"[red]demo stopped: a stage failed (exit {code})[/]; see llava-cluster status {run}",
                      highlight=False)
        return code
    metrics = json.loads((run / "validate" / "metrics.json").read_text())
    em = metrics["comparison"]["exact_match"]
    console.print(
        f"\n[bold green]demo done[/] in {time.time() - started:.0f} s: exact match "
        f"{metrics['base']['exact_match']:.0%} (base) -> {metrics['finetuned']['exact_match']:.0%} (fine-tuned), "
        f"{em['delta'] * 100:+.0f} points (95% CI {em['ci_low'] * 100:+.0f} to {em['ci_high'] * 100:+.0f}) on "
        f"{metrics['samples']} held-out samples; the report's path is printed above\n"
        f"status: llava-cluster status {run}", highlight=False)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "example:\n  llava-cluster demo --workdir .demo     # re-running resumes / skips finished stages\n"
    parser.add_argument("--workdir", type=Path, default=Path(".demo"), help="where the tiny model and the run go")
    parser.add_argument("--samples", type=int, default=600, help="synthetic samples to generate")
    parser.set_defaults(func=lambda a: run_demo(a.workdir, a.samples))
