"""The SLURM backend against a real slurmctld with two slurmd nodes (n1, n2): ../shared/slurm/start-slurm.sh.

Every scenario is submitted at once by one module fixture (the cluster runs them side by side), then
each test checks its own: sacct states, state files, artifacts.
  chain       `llava-cluster submit --backend slurm` from a shell whose PATH lacks the venv (as a user's
              may): train -> merge -> validate, three chained jobs
  two_nodes   train with 2 nodes x 1 rank under ZeRO-3 (gloo), one copy of each artifact
  script      slurm/pipeline.sh (plain sbatch, afterok) on the same tiny run
  interrupted like chain's train; SIGUSR2 mid-run -> checkpoint, exit 75, requeue, resume; its final
              adapter is compared with chain's
  failing     train on broken data: train FAILED, merge/validate CANCELLED, states say why
  limit       a stage that is always preempted (max_requeues=1): requeued once, then failed clearly
and, on its own: a run still queued.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_cluster.launch import slurm
from llava_cluster.rundir import RunDir, atomic_write_text
from llava_cluster.spec import spec_from_dict

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MAX_STEPS = 10
WAIT_SECONDS = 900


def _slurm_reachable() -> str | None:
    for tool in ("sbatch", "squeue", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"scontrol ping: {(ping.stdout + ping.stderr).strip()}"
    if acct.returncode != 0:
        return f"sacct (accounting) does not answer: {acct.stderr.strip()}"
    return None


_why_not = _slurm_reachable()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(_why_not is not None,
                       reason=f"no SLURM reachable ({_why_not}); start one with ../shared/slurm/start-slurm.sh"),
]


def tiny_spec(tiny, storage: Path, name: str, **changes) -> dict:
    spec = {
        "name": name, "storage": str(storage), "method": "lora",
        "model": {"base": str(tiny.model)},
        "data": {"train": str(tiny.train), "eval": str(tiny.val), "image_folder": str(tiny.images),
                 "max_length": 256, "num_workers": 0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},  # no RNG in the forward: resume must match exactly
        "optim": {"lr": 2e-3, "projector_lr": 2e-3, "max_steps": MAX_STEPS, "per_device_batch": 4, "seed": 7},
        "training": {"deepspeed": "zero3", "precision": "fp32", "gradient_checkpointing": False,
                     "save_steps": 5, "logging_steps": 1,
                     "deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
        "resources": {"nodes": 1, "gpus_per_node": 1, "cpus_per_task": 1, "time": "00:20:00"},
        "slurm": {"max_requeues": 2},  # the stage runs with the worker's interpreter: no venv on PATH needed
        "validation": {"max_samples": 8, "batch_size": 8, "max_new_tokens": 4},
        "merge": {"dtype": "fp32"},
        "env": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    }
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            spec[section][key] = value
        else:
            spec[section] = value
    return spec


def freeze(spec_dict: dict):
    """What `submit` does before calling the backend: validate, then write spec.yaml into the run dir."""
    spec = spec_from_dict(spec_dict)
    atomic_write_text(RunDir(spec.run_dir).spec_path, spec.to_yaml())
    return spec


def job_ids(run: RunDir, stage: str) -> list[str]:
    return run.read_state(stage).job_ids


def sacct(ids: list[str], duplicates: bool = False) -> list[tuple[str, str]]:
    args = ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids)] + (["-D"] if duplicates else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [(line.split("|")[0], line.split("|")[1].split()[0]) for line in out.splitlines() if line]


def queued(ids: list[str]) -> bool:
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True).stdout
    return bool(out.strip())


def metrics_steps(run: RunDir) -> int:
    path = run.logs_dir / "train_metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def cluster_runs(tiny_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("slurm-store")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    runs: dict[str, RunDir] = {}
    timings: dict[str, float] = {}

    # chain: through the CLI, exactly as a user would, from a shell that never activated the venv
    chain = tiny_spec(tiny_dir, storage, "chain")
    spec_file = storage / "chain.yaml"
    spec_file.write_text(json.dumps(chain))
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != VENV_BIN.resolve())
    no_venv = {k: v for k, v in env.items() if k != "VIRTUAL_ENV"} | {"PATH": path}
    started = time.time()
    submitted = subprocess.run([str(VENV_BIN / "llava-cluster"), "submit", str(spec_file), "--backend", "slurm"],
                               capture_output=True, text=True, env=no_venv, cwd=storage)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    runs["chain"] = RunDir(spec_from_dict(chain).run_dir)

    # two_nodes: one rank on each of n1 and n2
    two = freeze(tiny_spec(tiny_dir, storage, "two-nodes", resources__nodes=2))
    slurm.submit(two, ["train"], dry_run=False)
    runs["two_nodes"] = RunDir(two.run_dir)

    # script: plain sbatch through pipeline.sh
    script = freeze(tiny_spec(tiny_dir, storage, "script"))
    piped = subprocess.run(["bash", str(REPO / "slurm/pipeline.sh")], capture_output=True, text=True, env={
        **env, "RUN_DIR": str(script.run_dir), "LLAVA_CLUSTER": str(VENV_BIN / "llava-cluster"),
        "NODES": "1", "GPUS_PER_NODE": "1", "CPUS_PER_TASK": "1", "TRAIN_TIME": "20"})
    assert piped.returncode == 0, piped.stderr
    runs["script"] = RunDir(script.run_dir)
    script_jobs = [line.split()[2] for line in piped.stderr.splitlines() if ": job " in line]

    # interrupted: same training as chain's, signalled once it is past its first step
    interrupted = freeze(tiny_spec(tiny_dir, storage, "interrupted"))
    slurm.submit(interrupted, ["train"], dry_run=False)
    runs["interrupted"] = RunDir(interrupted.run_dir)

    # failing: the training data is not JSON
    broken = storage / "broken.json"
    broken.write_text('[{"id": "a", "conversations": [')
    failing = freeze(tiny_spec(tiny_dir, storage, "failing", data={"train": str(broken), "eval": str(tiny_dir.val),
                                                                  "image_folder": str(tiny_dir.images)}))
    slurm.submit(failing, ["train", "merge", "validate"], dry_run=False)
    runs["failing"] = RunDir(failing.run_dir)

    # limit: a stand-in stage that always reports "preempted"
    fake = storage / "always-preempted.sh"
    fake.write_text("#!/bin/bash\nexit 75\n")
    limit = freeze(tiny_spec(tiny_dir, storage, "limit", slurm={"python": f"bash {fake}", "max_requeues": 1}))
    slurm.submit(limit, ["train", "merge"], dry_run=False)
    runs["limit"] = RunDir(limit.run_dir)

    all_ids = [i for run in runs.values() for s in ("train", "merge", "validate") for i in job_ids(run, s)]
    all_ids += [i for i in script_jobs if i not in all_ids]
    signalled = False
    deadline = time.time() + WAIT_SECONDS
    while queued(all_ids) and time.time() < deadline:
        if not signalled and metrics_steps(runs["interrupted"]) >= 1:
            subprocess.run(["scancel", "--signal=USR2", job_ids(runs["interrupted"], "train")[-1]], check=True)
            signalled = True
        if "chain" not in timings and not queued(job_ids(runs["chain"], "validate")):
            timings["chain"] = time.time() - started
        time.sleep(0.5)
    timings.setdefault("chain", time.time() - started)
    print(f"\nsubmit-to-finish of the tiny pipeline (chain) on the local SLURM: {timings['chain']:.0f} s")
    assert not queued(all_ids), f"jobs still queued after {WAIT_SECONDS} s: {all_ids}"
    return {"runs": runs, "signalled": signalled, "script_jobs": script_jobs, "timings": timings,
            "chain_path": path}


def stage_jobs(run: RunDir) -> dict[str, list[str]]:
    return {s: job_ids(run, s) for s in ("train", "merge", "validate")}


def assert_full_run(run: RunDir) -> None:
    for stage in ("train", "merge", "validate"):
        state = run.read_state(stage)
        assert state.status == "succeeded", (stage, state)
    for name in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
                 "llava_cluster.json"):
        assert (run.final_dir / name).is_file(), name
    assert (run.merged_dir / "config.json").is_file() and (run.merged_dir / "model.safetensors").is_file()
    metrics = json.loads((run.validate_dir / "metrics.json").read_text())
    assert metrics  # written by validate; its content is the coordinator's tests' business


def test_chain_completes_as_three_dependent_jobs(cluster_runs):
    run = cluster_runs["runs"]["chain"]
    ids = stage_jobs(run)
    assert all(len(v) == 1 for v in ids.values()), ids
    assert slurm.job_states([ids["train"][0], ids["merge"][0], ids["validate"][0]]) == {
        ids["train"][0]: "COMPLETED", ids["merge"][0]: "COMPLETED", ids["validate"][0]: "COMPLETED"}
    script = (run.logs_dir / "slurm" / f"{ids['merge'][0]}_submission.sh").read_text()
    assert f"--dependency=afterok:{ids['train'][0]}" in script
    assert_full_run(run)


def test_resubmitting_a_finished_run_submits_nothing(cluster_runs):
    run = cluster_runs["runs"]["chain"]
    again = subprocess.run([str(VENV_BIN / "llava-cluster"), "submit", str(run.root.parents[1] / "chain.yaml"),
                            "--backend", "slurm"], capture_output=True, text=True)
    assert again.returncode == 0 and "every stage already succeeded" in again.stdout
    assert all(len(v) == 1 for v in stage_jobs(run).values())


def test_two_node_zero3_training_writes_one_copy_of_each_artifact(cluster_runs):
    from safetensors import safe_open

    run = cluster_runs["runs"]["two_nodes"]
    job = job_ids(run, "train")[-1]
    assert sacct([job]) == [(job, "COMPLETED")]
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "NNodes,NodeList", "-j", job],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert nodes == "2|n[1-2]"
    assert run.read_state("train").status == "succeeded"
    consoles = sorted((run.logs_dir / "slurm").glob(f"{job}_*_log.out"))
    assert [p.name for p in consoles] == [f"{job}_0_log.out", f"{job}_1_log.out"]  # one task per node
    files = sorted(p.relative_to(run.final_dir).as_posix() for p in run.final_dir.rglob("*") if p.is_file())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "llava_cluster.json",
                     "non_lora_trainables.safetensors"]
    assert not list(run.root.rglob(".tmp-*")) and not list(run.root.rglob("*.tmp"))
    with safe_open(run.final_dir / "adapter_model.safetensors", "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    assert shapes and all(0 not in shape for shape in shapes)  # ZeRO-3 gathered, not empty partitions


def test_pipeline_script_runs_the_same_chain_with_plain_sbatch(cluster_runs):
    run, ids = cluster_runs["runs"]["script"], cluster_runs["script_jobs"]
    assert len(ids) == 3
    assert [state for _, state in sacct(ids)] == ["COMPLETED"] * 3
    assert_full_run(run)
    assert f"[llava-cluster] validate: job {ids[2]}" in (run.logs_dir / "slurm" / f"{ids[2]}.out").read_text()


def test_interrupted_training_requeues_and_resumes_from_its_checkpoint(cluster_runs):
    assert cluster_runs["signalled"], "the interrupted run finished before it could be signalled"
    run = cluster_runs["runs"]["interrupted"]
    job = job_ids(run, "train")[-1]
    assert [state for _, state in sacct([job], duplicates=True)] == ["REQUEUED", "COMPLETED"]
    state = run.read_state("train")
    assert state.status == "succeeded" and state.attempts == 2 and state.job_ids == [job]
    console = " ".join((run.logs_dir / "slurm" / f"{job}_0_log.out").read_text().split())  # undo line wraps
    stopped_at = int(console.split("preempted at step ")[1].split(":")[0])
    assert 1 <= stopped_at < MAX_STEPS
    assert f"resuming from {run.train_dir}/checkpoint-{stopped_at}" in console
    # the non-TTY task log carries one plain progress line per step of both attempts
    assert [f"progress step={n}/{MAX_STEPS} " in console for n in range(1, MAX_STEPS + 1)] == [True] * MAX_STEPS


def test_interrupted_training_ends_with_the_same_adapter_as_an_uninterrupted_run(cluster_runs):
    import torch
    from safetensors.torch import load_file

    run, reference = cluster_runs["runs"]["interrupted"], cluster_runs["runs"]["chain"]
    assert run.read_state("train").attempts == 2
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        got, want = load_file(run.final_dir / name), load_file(reference.final_dir / name)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")


def test_failing_train_cancels_merge_and_validate_and_status_says_why(cluster_runs):
    run = cluster_runs["runs"]["failing"]
    ids = stage_jobs(run)
    states = slurm.job_states([ids["train"][0], ids["merge"][0], ids["validate"][0]])
    assert states == {ids["train"][0]: "FAILED", ids["merge"][0]: "CANCELLED", ids["validate"][0]: "CANCELLED"}
    train = run.read_state("train")
    assert train.status == "failed" and "broken.json" in train.error
    for stage in ("merge", "validate"):
        state = run.read_state(stage)
        assert state.status == "cancelled" and f"train failed (job {ids['train'][0]})" in state.error
    status = subprocess.run([str(VENV_BIN / "llava-cluster"), "status", str(run.root), "--json"],
                            capture_output=True, text=True)
    assert status.returncode == 0
    stages = {s["stage"]: s for s in json.loads(status.stdout)["stages"]}
    assert stages["train"]["status"] == "failed" and "broken.json" in stages["train"]["error"]
    assert stages["merge"]["status"] == "cancelled" and "train failed" in stages["merge"]["error"]


def test_requeue_limit_fails_clearly(cluster_runs):
    run = cluster_runs["runs"]["limit"]
    train, merge = job_ids(run, "train")[-1], job_ids(run, "merge")[-1]
    assert [s for _, s in sacct([train], duplicates=True)] == ["REQUEUED", "FAILED"]
    assert slurm.job_states([merge]) == {merge: "CANCELLED"}
    state = run.read_state("train")
    assert state.status == "failed"
    assert "requeue limit reached: interrupted 2 times and slurm.max_requeues is 1" in state.error
    assert run.read_state("merge").status == "cancelled"


def test_a_run_still_queued_is_not_submitted_twice(tiny_dir, tmp_path):
    spec = freeze(tiny_spec(tiny_dir, tmp_path, "held", slurm={"python": "true", "extra_sbatch": ["--hold"]}))
    slurm.submit(spec, ["train"], dry_run=False)
    job = job_ids(RunDir(spec.run_dir), "train")[-1]
    try:
        with pytest.raises(Exception, match=f"still pending as SLURM job {job}"):
            slurm.submit(spec, ["train"], dry_run=False)
    finally:
        subprocess.run(["scancel", job], check=False)


def test_submit_from_a_shell_without_the_venv_runs_every_stage(cluster_runs):
    """With no container the stage runs as `<worker python> -m llava_cluster.cli`: a bare `llava-cluster`
    would be looked up on the job's PATH, which sbatch copies from a shell that never activated the venv
    (the chain's)."""
    path, run = cluster_runs["chain_path"], cluster_runs["runs"]["chain"]
    assert shutil.which("llava-cluster", path=path) is None and shutil.which("sbatch", path=path)
    ids = [i for s in ("train", "merge", "validate") for i in job_ids(run, s)]
    consoles = "".join(p.read_text() for p in (run.logs_dir / "slurm").glob("*_log.out"))
    assert "FileNotFoundError" not in consoles
    assert [state for _, state in sacct(ids)] == ["COMPLETED"] * 3, consoles[-3000:]
    assert_full_run(run)
