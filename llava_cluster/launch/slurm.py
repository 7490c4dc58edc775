"""SLURM backend: one sbatch job per stage through submitit, chained train -> merge -> validate.

Layout (why): every job is `srun` with one task per GPU (`--ntasks-per-node=gpus_per_node`); each
task is one rank, its RANK/LOCAL_RANK/WORLD_SIZE come from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS and
the rendezvous is the first node of the allocation (MASTER_ADDR, exported by the batch script from
`scontrol show hostnames`, so it also works inside containers that lack scontrol). No hostfile, no
ssh, no torchrun agent: `--signal=USR2@N` and preemption's SIGTERM reach every rank directly, which
is what lets all ranks agree on a last checkpoint before the limit.

Chaining: merge runs `--dependency=afterok:<train>`, validate `afterok:<merge>`, both with
`--kill-on-invalid-dep=yes`, so a failed stage cancels the rest. Each task runs
`llava_cluster.launch.slurm_job.StageJob`, which supervises `<llava-cluster> stage <stage> --run-dir`
and asks for a requeue after exit 75 (see there). The stage runs with the worker's own interpreter
(`<python> -m llava_cluster.cli`: the submitting venv's without a container, the image's python3
inside one) unless `slurm.python` names another command, so nothing depends on the PATH of the job.
Every spec value in the script is validated at load (`spec/text.py`: no control characters, SLURM's
syntax) and shell-quoted here. Containers: pyxis (`srun --container-image`) or
Apptainer (`apptainer exec --nv`), the storage root and the folders of the spec's other local paths mounted
at the same path.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from llava_cluster.console import console, err_console
from llava_cluster.errors import UserError
from llava_cluster.launch.slurm_job import StageJob, stage_command
from llava_cluster.rundir import STAGES, RunDir
from llava_cluster.spec import SLURM_TIME, RunSpec, local_paths
from llava_cluster.spec.paths import FILE_FIELDS

CONTAINER_PYTHON = "python3"  # the interpreter inside the image (it has llava-cluster and submitit)
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "RESIZING"}


def slurm_minutes(text: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    match = SLURM_TIME.fullmatch(text.strip())
    if not match:
        raise UserError(f"resources.time: {text!r} is not a SLURM time (e.g. 90, 04:00:00, 2-00:00:00)")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    return max(1, -(-seconds // 60))


def logs_folder(spec: RunSpec) -> Path:
    """submitit's folder: batch scripts, pickles and each task's console output (%j_%t_log.out)."""
    return RunDir(spec.run_dir).logs_dir / "slurm"


def container_mounts(spec: RunSpec) -> list[str]:
    """Same-path mounts: the storage root, the folder of every other local path of the spec
    (`local_paths`: a folder itself, a file's parent) not inside one already, then the spec's extra mounts."""
    paths = local_paths(spec)
    folders = {Path(value).parent if dotted in FILE_FIELDS else Path(value) for dotted, value in paths.items()}
    mounts = [Path(spec.storage)]
    for folder in sorted(folders, key=lambda f: (len(str(f)), str(f))):  # a parent before its children
        if not any(folder.is_relative_to(m) for m in mounts):
            mounts.append(folder)
    return [str(m) for m in mounts] + [m for m in spec.slurm.container.mounts if m not in map(str, mounts)]


def _pyxis_mounts(mounts: list[str]) -> str:
    return ",".join(m if ":" in m else f"{m}:{m}" for m in mounts)


def worker_python(spec: RunSpec) -> str:
    """The command that starts submitit's worker in each task (inside the container, if any)."""
    container = spec.slurm.container
    if container.runtime == "apptainer":
        binds = ",".join(container_mounts(spec))
        return shlex.join(["apptainer", "exec", "--nv", "--bind", binds, str(container.image), CONTAINER_PYTHON])
    if container.runtime == "pyxis":
        return CONTAINER_PYTHON
    return shlex.quote(sys.executable)


def stage_entry(spec: RunSpec) -> str:
    """The command line of llava-cluster in each task: slurm.python, else the worker's interpreter."""
    if spec.slurm.python:
        return spec.slurm.python
    python = sys.executable if spec.slurm.container.runtime == "none" else CONTAINER_PYTHON
    return shlex.join([python, "-m", "llava_cluster.cli"])


def srun_args(spec: RunSpec) -> list[str]:
    container = spec.slurm.container
    if container.runtime != "pyxis":
        return []
    return [f"--container-image={container.image}", f"--container-mounts={_pyxis_mounts(container_mounts(spec))}"]


def extra_sbatch(options: list[str]) -> dict[str, Any]:
    """`--constraint=h100`, `--exclusive` -> submitit's additional_parameters (which quotes the values;
    the spec allows only `--name[=value]` options)."""
    parsed: dict[str, Any] = {}
    for option in options:
        key, sep, value = option[2:].partition("=")
        parsed[key] = value if sep else True
    return parsed


def setup_lines(spec: RunSpec) -> list[str]:
    lines = ['export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"']
    lines += [f"export {shlex.quote(f'{key}={value}')}" for key, value in spec.env.items()]
    return lines


def teardown_lines(spec: RunSpec) -> list[str]:
    """Runs in the batch shell after srun, outside any container: performs the requested requeue,
    then exits with srun's status (else the job would end COMPLETED and release its dependents)."""
    marker = f"{shlex.quote(str(logs_folder(spec)))}/requeue-$SLURM_JOB_ID"
    return ["srun_status=$?",
            f'if [ -e {marker} ]; then rm -f {marker}; scontrol requeue "$SLURM_JOB_ID"; fi',
            'exit "$srun_status"']


def job_parameters(spec: RunSpec, stage: str, dependency: str | None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one stage. Only `train` is multi-rank."""
    res, slurm = spec.resources, spec.slurm
    ranks_per_node = res.gpus_per_node if stage == "train" else 1
    additional: dict[str, Any] = {"requeue": True, "kill-on-invalid-dep": "yes"}
    additional.update(extra_sbatch(slurm.extra_sbatch))
    params: dict[str, Any] = {
        "job_name": f"{spec.name}-{stage}",
        "nodes": res.nodes if stage == "train" else 1,
        "ntasks_per_node": ranks_per_node,
        "gpus_per_node": ranks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "mem": res.mem,
        "time": slurm_minutes(res.time),
        "signal_delay_s": slurm.signal_seconds,
        "stderr_to_stdout": True,
        "setup": setup_lines(spec),
        "teardown": teardown_lines(spec),
        "srun_args": srun_args(spec),
        "additional_parameters": additional,
    }
    for key in ("partition", "account", "qos"):
        if getattr(slurm, key):
            params[key] = getattr(slurm, key)
    if dependency:
        params["dependency"] = dependency
    return params


def stage_job(spec: RunSpec, stage: str, downstream: list[str]) -> StageJob:
    return StageJob(
        stage=stage,
        run_dir=str(spec.run_dir),
        command=stage_command(stage_entry(spec), stage, spec.run_dir),
        max_requeues=spec.slurm.max_requeues,
        downstream=tuple(downstream),
        marker_folder=str(logs_folder(spec)),
    )


def render(spec: RunSpec, stage: str, dependency: str | None) -> str:
    """The sbatch script submitit would write for this stage (for --dry-run and tests)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = logs_folder(spec)
    command = " ".join([worker_python(spec), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **job_parameters(spec, stage, dependency))


def active_jobs(job_ids: list[str]) -> dict[str, str]:
    """Job id -> state for those of `job_ids` that SLURM still holds as queued or running."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    found: dict[str, str] = {}
    for job_id in job_ids:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", job_id],
                             capture_output=True, text=True, timeout=60).stdout
        for line in out.splitlines():
            jid, _, state = line.partition(" ")
            if state in ACTIVE_STATES:
                found[jid] = state
    return found


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Job id -> SLURM accounting state (COMPLETED, FAILED, CANCELLED, ...) from sacct."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=60).stdout
    states = {}
    for line in out.splitlines():
        jid, _, state = line.partition("|")
        states[jid] = state.split()[0] if state else ""
    return states


def _refuse_duplicates(run: RunDir, stages: list[str]) -> None:
    for stage in stages:
        ids = run.read_state(stage).job_ids
        live = active_jobs(ids[-1:])
        if live:
            job_id, state = next(iter(live.items()))
            raise UserError(f"{stage} of this run is still {state.lower()} as SLURM job {job_id}: wait for it, "
                            f"or `scancel {job_id}` and submit again (the run resumes from its last checkpoint)")


def _dry_run(spec: RunSpec, stages: list[str]) -> int:
    previous = None
    for stage in stages:
        dependency = f"afterok:<{previous} job id>" if previous else None
        console.rule(f"[bold]{stage}[/] job (sbatch script submitit would write)")
        console.print(render(spec, stage, dependency), markup=False, highlight=False, soft_wrap=True)
        console.print(f"# each task runs: {shlex.join(stage_command(stage_entry(spec), stage, spec.run_dir))}",
                      markup=False, highlight=False, soft_wrap=True)
        previous = stage
    console.print(f"dry run: nothing submitted ({len(stages)} job(s) for {spec.run_dir})")
    return 0


def submit(spec: RunSpec, stages: list[str], dry_run: bool) -> int:
    """Submit `stages` (those not yet succeeded, in order) as chained jobs; record job ids in state/."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]
    if not stages:
        console.print("nothing to submit: every stage already succeeded")
        return 0
    if dry_run:
        return _dry_run(spec, stages)
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise UserError("sbatch/srun not found: submit from a SLURM login node (or use --dry-run to see the jobs)")
    import submitit

    run = RunDir(spec.run_dir)
    _refuse_duplicates(run, stages)
    folder = logs_folder(spec)
    folder.mkdir(parents=True, exist_ok=True)
    submitted: list[tuple[str, str, str | None]] = []
    previous: str | None = None
    for i, stage in enumerate(stages):
        dependency = f"afterok:{previous}" if previous else None
        executor = submitit.SlurmExecutor(folder=folder, python=worker_python(spec))
        executor.update_parameters(**job_parameters(spec, stage, dependency))
        try:
            job = executor.submit(stage_job(spec, stage, stages[i + 1:]))
        except Exception as err:  # sbatch refused: bad partition, account, resources ...
            _cancel([job_id for _, job_id, _ in submitted])
            raise UserError(f"sbatch refused the {stage} job: {str(err).strip()}") from None
        state = run.read_state(stage)
        run.update_state(stage, status="pending", job_ids=[*state.job_ids, job.job_id], error=None,
                         finished_at=None)
        submitted.append((stage, job.job_id, previous))
        previous = job.job_id
    _print_submitted(spec, submitted)
    return 0


def _cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False, timeout=60)


def _print_submitted(spec: RunSpec, submitted: list[tuple[str, str, str | None]]) -> None:
    from rich.table import Table

    res = spec.resources
    table = Table(title=f"submitted {spec.name} to SLURM", title_justify="left")
    for column in ("stage", "job", "after", "ranks"):
        table.add_column(column)
    for stage, job_id, after in submitted:
        ranks = f"{res.nodes}x{res.gpus_per_node}" if stage == "train" else "1"
        table.add_row(stage, job_id, f"afterok:{after}" if after else "-", ranks)
    console.print(table)
    console.print(f"console output of each task: {logs_folder(spec)}/<job>_<task>_log.out",
                  highlight=False, soft_wrap=True)
    err_console.print(f"follow it: llava-cluster status {spec.run_dir}   |   "
                      f"llava-cluster logs {spec.run_dir} {submitted[0][0]} --follow", highlight=False, soft_wrap=True)
