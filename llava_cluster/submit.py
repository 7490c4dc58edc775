"""`llava-cluster submit SPEC --backend local|slurm|k8s`: validate the spec, freeze it into the run
directory, and hand the stages that have not yet succeeded to a backend. Re-submitting a run skips
succeeded stages; `train` resumes from its last complete checkpoint."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from llava_cluster.console import console, err_console
from llava_cluster.preflight import preflight
from llava_cluster.rundir import STAGES, RunDir
from llava_cluster.spec import RunSpec, load_spec
from llava_cluster.spec.frozen import freeze

BACKENDS = {"local": "llava_cluster.launch.local", "slurm": "llava_cluster.launch.slurm",
            "k8s": "llava_cluster.launch.k8s"}


def pending_stages(spec: RunSpec, run: RunDir) -> list[str]:
    wanted = [s for s in STAGES if s != "validate" or spec.data.eval]
    return [s for s in wanted if run.read_state(s).status != "succeeded"]


def submit(spec_path: Path, overrides: list[str], backend: str, dry_run: bool,
           only: tuple[str, ...] = STAGES) -> int:
    spec = load_spec(spec_path, overrides)
    run = RunDir(spec.run_dir)
    if backend == "k8s" and not Path(spec.model.base).exists():
        # the inputs live on the cluster's volume: the train stage checks them before its ranks start
        err_console.print("inputs are not visible from here (cluster volume): checked in the pod before training")
        stages = [s for s in STAGES if s != "validate" or spec.data.eval]
    else:
        preflight(spec, what="submitting" if not dry_run else "submitting (dry run: a real submit stops here too)",
                  backend=backend)
        if not dry_run:
            freeze(spec, run)
        stages = pending_stages(spec, run)
    stages = [s for s in stages if s in only]
    if not stages:
        console.print(f"run {spec.name}: every stage already succeeded — see {run.validate_dir}")
        return 0
    err_console.print(f"run [bold]{spec.name}[/] -> {run.root}\nstages: {' -> '.join(stages)} "
                  f"({backend}{', dry run' if dry_run else ''})", highlight=False)
    module = importlib.import_module(BACKENDS[backend])
    return module.submit(spec, stages, dry_run)


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  llava-cluster submit jobs/tiny-local.yaml --backend local\n"
        "  llava-cluster submit jobs/lora-13b-multinode.yaml --backend slurm --dry-run\n"
        "  llava-cluster submit jobs/qlora-13b-1node.yaml --backend k8s optim.lr=1e-4 name=qlora-try2\n\n"
        "Overrides are key=value with dotted keys into the spec (values parsed as YAML).\n"
        "Re-submitting a run skips succeeded stages and resumes training from its last checkpoint.\n"
    )
    parser.add_argument("spec", type=Path, help="run spec YAML (see jobs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="local")
    parser.add_argument("--dry-run", action="store_true", help="print what would run or be submitted; change nothing")
    parser.set_defaults(func=lambda a: submit(a.spec, a.overrides, a.backend, a.dry_run))
