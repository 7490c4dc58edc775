"""Kubernetes launcher: one run spec -> the manifests of its stages, applied with `kubectl apply`.

    ConfigMap  <run>-spec       the spec, mounted at /etc/llava-cluster/spec.yaml; `stage --spec`
                                freezes it into the run directory (the submitting machine usually
                                cannot see the shared volume)
    train      k8s.api trainer-v2 (default): a Kubeflow Trainer v2 TrainJob and its TrainingRuntime
               (launch/k8s_trainer.py), LoRA on `nodes` nodes, QLoRA on one;
               k8s.api pytorchjob (training operator v1): LoRA as a PyTorchJob (Master + nodes-1
               Workers, nprocPerNode = GPUs per node), QLoRA as a batch/v1 Job on one node
    merge      a batch/v1 Job on CPU (merging is memory-bound arithmetic; it frees no GPU to wait on)
    validate   a batch/v1 Job with one GPU

Kubernetes has no dependencies between Jobs, so merge and validate start with an init container
(launch/k8s_wait.py) that blocks until the previous stage's `state/<stage>.json` says succeeded. It
exits 3 when that stage stays failed, and a podFailurePolicy turns exit 3 into a failed Job instead
of a retry. While it waits, the pod holds its own requests:
validate keeps one GPU reserved during training (submit validate later if that matters). The same
ordering serves both APIs and stages submitted separately (`--stages merge`); a JobSet `dependsOn`
would only order replicated Jobs inside the TrainJob's own runtime, whose torch plugin treats every
node Job as a training rank.

`k8s.queue` (Kueue) labels every workload with its LocalQueue and creates it suspended; `k8s.gang`
gang-schedules the train pods with Volcano or the coscheduling plugin; `k8s.priority_class` names
every pod's PriorityClass. The pod policy is in launch/k8s_pod.py.

Spec strings reach the manifests only as YAML scalars written by the dumper (never through a shell:
containers get argument lists), and the spec's load (`spec/text.py`) has already refused control
characters and names that are not Kubernetes names.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import PurePosixPath
from typing import Any

import yaml

from llava_cluster.errors import UserError
from llava_cluster.launch.k8s_pod import TRAIN_RESTARTS, k8s_name, meta, pod, queued, resources, stage_args
from llava_cluster.launch.k8s_trainer import train_stage
from llava_cluster.launch.k8s_wait import WAIT_FAILED_EXIT, waiter_args
from llava_cluster.rundir import PREEMPTED_EXIT
from llava_cluster.spec import RunSpec, local_paths

FINISHED_TTL = 7 * 24 * 3600  # finished Jobs (and their logs) stay a week
UPSTREAM = {"merge": "train", "validate": "merge"}


def paths_outside_mount(spec: RunSpec) -> list[str]:
    """Spec paths a pod would not see: everything must live on the shared volume."""
    mount = PurePosixPath(spec.k8s.mount_path)
    return [f"{dotted}: {value}" for dotted, value in local_paths(spec).items()
            if not PurePosixPath(value).is_relative_to(mount)]


def _config_map(spec: RunSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(spec, k8s_name(spec.name, "spec"), "spec"),
            "data": {"spec.yaml": spec.to_yaml()}}


def _pytorchjob(spec: RunSpec) -> dict[str, Any]:
    """Multi-node (or multi-GPU) LoRA: the operator injects MASTER_*/PET_* and the stage starts
    torchrun with PET_NPROC_PER_NODE ranks on every pod."""
    gpus = spec.resources.gpus_per_node
    container = {"name": "pytorch", "args": stage_args(spec, "train"),
                 "resources": resources(spec, gpus)}

    def replicas(n: int) -> dict[str, Any]:
        # OnFailure: a failed rank restarts in place, every rank re-rendezvouses and resumes from
        # the last complete checkpoint; runPolicy.backoffLimit bounds the retries.
        return {"replicas": n, "restartPolicy": "OnFailure",
                "template": pod(spec, "train", container, shm=True, gang=True)}

    specs = {"Master": replicas(1)}
    if spec.resources.nodes > 1:
        specs["Worker"] = replicas(spec.resources.nodes - 1)
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": TRAIN_RESTARTS,
                                  "ttlSecondsAfterFinished": FINISHED_TTL}
    if queued(spec):
        run_policy["suspend"] = True
    if spec.k8s.gang:
        # the operator (started with --gang-scheduler-name) makes the PodGroup: all nodes or none
        run_policy["schedulingPolicy"] = {"minAvailable": spec.resources.nodes}
        if spec.k8s.priority_class:
            run_policy["schedulingPolicy"]["priorityClass"] = spec.k8s.priority_class
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": meta(spec, k8s_name(spec.name, "train"), "train", workload=True),
        "spec": {"nprocPerNode": str(gpus), "runPolicy": run_policy, "pytorchReplicaSpecs": specs},
    }


def _job(spec: RunSpec, stage: str, container: dict[str, Any], init: list[dict[str, Any]] | None,
         shm: bool, failure_rules: list[dict[str, Any]]) -> dict[str, Any]:
    template = pod(spec, stage, container, init=init, shm=shm, gang=stage == "train")
    template["spec"]["restartPolicy"] = "Never"  # required by podFailurePolicy
    rules = failure_rules + [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    job_spec: dict[str, Any] = {"backoffLimit": 2, "ttlSecondsAfterFinished": FINISHED_TTL,
                                "podFailurePolicy": {"rules": rules}, "template": template}
    if queued(spec):
        job_spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": meta(spec, k8s_name(spec.name, stage), stage, workload=True), "spec": job_spec}


def _qlora_job(spec: RunSpec) -> dict[str, Any]:
    """Single-node QLoRA: no PyTorchJob needed; the stage starts `gpus_per_node` ranks itself."""
    gpus = spec.resources.gpus_per_node
    container = {"name": "train", "args": stage_args(spec, "train"),
                 "resources": resources(spec, gpus)}
    # Preempted after a complete checkpoint (exit 75): a new pod resumes; not counted as a failure.
    rules = [{"action": "Ignore", "onExitCodes": {"containerName": "train", "operator": "In",
                                                  "values": [PREEMPTED_EXIT]}}]
    return _job(spec, "train", container, None, shm=True, failure_rules=rules)


def _post_train_job(spec: RunSpec, stage: str) -> dict[str, Any]:
    upstream = UPSTREAM[stage]
    waiter = {"name": f"wait-for-{upstream}",
              "args": waiter_args(upstream, spec.run_dir),
              "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}}
    gpus = 1 if stage == "validate" else 0
    container = {"name": stage, "args": stage_args(spec, stage),
                 "resources": resources(spec, gpus)}
    rules = [{"action": "FailJob", "onExitCodes": {"containerName": waiter["name"], "operator": "In",
                                                   "values": [WAIT_FAILED_EXIT]}}]
    return _job(spec, stage, container, [waiter], shm=gpus > 0, failure_rules=rules)


def render(spec: RunSpec, stages: list[str]) -> list[dict[str, Any]]:
    """The manifests for `stages` of the run, in apply order: the spec ConfigMap, then the stages'
    objects (under trainer-v2 the train stage is its TrainingRuntime, then the TrainJob). Pure:
    reads nothing, writes nothing."""
    unknown = [s for s in stages if s not in ("train", *UPSTREAM)]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; stages are train, merge, validate")
    docs = [_config_map(spec)]
    if "train" in stages:
        if spec.k8s.api == "trainer-v2":
            docs += train_stage(spec)
        else:
            docs.append(_qlora_job(spec) if spec.method == "qlora" else _pytorchjob(spec))
    docs += [_post_train_job(spec, s) for s in ("merge", "validate") if s in stages]
    return docs


class _PlainDumper(yaml.SafeDumper):
    """Writes shared sub-objects (e.g. the Master's and Workers' container) out in full, not as
    YAML anchors: manifests are read by people and by tools that do not expand aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_PlainDumper, sort_keys=False)


def _kubectl(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("kubectl")
    if not exe:
        raise UserError("kubectl not found on PATH: install it, or run with --dry-run and apply the "
                        "printed manifests from a machine that has it (kubectl apply -f -)")
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, check=False)


def _existing(spec: RunSpec, docs: list[dict[str, Any]]) -> list[str]:
    """Workloads of this run that already exist: `kubectl apply` would leave a finished one as it is
    (or refuse to change its immutable template), so the stage would silently not run again."""
    refs = [f"{d['kind'].lower()}/{d['metadata']['name']}" for d in docs
            if d["kind"] not in ("ConfigMap", "TrainingRuntime")]  # configuration: apply updates it
    if not refs:
        return []
    found = _kubectl(["get", "-n", spec.k8s.namespace, "--ignore-not-found", "-o", "name", *refs])
    if found.returncode != 0:
        raise UserError(f"kubectl get {' '.join(refs)} failed: {found.stderr.strip()}")
    return found.stdout.split()


def submit(spec: RunSpec, stages: list[str], dry_run: bool) -> int:
    """Render the run's manifests; print them (dry run) or apply them with `kubectl apply -f -`."""
    from rich.markup import escape

    from llava_cluster.console import console, print_message

    outside = paths_outside_mount(spec)
    if outside:
        message = (f"these paths are not under k8s.mount_path={spec.k8s.mount_path}, so the pods would "
                   "not see them; put them on the shared volume:\n  " + "\n  ".join(outside))
        if not dry_run:
            raise UserError(message)
        print_message("warning", "bold yellow", message)
    docs = render(spec, stages)
    manifest = to_yaml(docs)
    if dry_run:
        sys.stdout.write(manifest)
        return 0
    existing = _existing(spec, docs)
    if existing:
        raise UserError(
            f"{', '.join(existing)} already exist in namespace {spec.k8s.namespace} from an earlier "
            f"submission. The run directory keeps all progress; delete them and submit again to resume:\n"
            f"  kubectl delete -n {spec.k8s.namespace} {' '.join(existing)}")
    applied = _kubectl(["apply", "-f", "-"], stdin=manifest)
    if applied.returncode != 0:
        raise UserError(f"kubectl apply failed (namespace {spec.k8s.namespace}):\n{applied.stderr.strip()}")
    console.print(applied.stdout.rstrip(), markup=False, highlight=False)
    console.print(f"[green]submitted[/] {', '.join(stages)} of [bold]{spec.name}[/]: follow with "
                  f"`llava-cluster status {escape(str(spec.run_dir))}` (on a machine that mounts the volume) or "
                  f"`kubectl get pods -n {spec.k8s.namespace} -l llava-cluster.io/run={spec.name}`",
                  highlight=False)
    return 0
