"""Kubernetes launcher: one run spec -> the manifests of its stages, applied with `kubectl apply`.

    ConfigMap  <run>-spec       the spec, mounted at /etc/llava-cluster/spec.yaml; `stage --spec`
                                freezes it into the run directory (the submitting machine usually
                                cannot see the shared volume)
    train      LoRA:  a Kubeflow PyTorchJob (Master + nodes-1 Workers, nprocPerNode = GPUs per node);
               QLoRA: a batch/v1 Job on one node (the stage starts its ranks with torchrun)
    merge      a batch/v1 Job on CPU (merging is memory-bound arithmetic; it frees no GPU to wait on)
    validate   a batch/v1 Job with one GPU

Kubernetes has no dependencies between Jobs, so merge and validate start with an init container
(`python -m llava_cluster.launch.k8s wait ...`) that blocks until the previous stage's
`state/<stage>.json` says succeeded. It exits 3 when that stage stays failed, and a podFailurePolicy
turns exit 3 into a failed Job instead of a retry. While it waits, the pod holds its own requests:
validate keeps one GPU reserved during training (submit validate later if that matters).

Every pod runs as a non-root user without privilege escalation, with all capabilities dropped, the
RuntimeDefault seccomp profile and a read-only root filesystem (HOME and caches live on /tmp); the
shared volume is the claim `spec.k8s.claim` mounted at `spec.k8s.mount_path`, /dev/shm is
memory-backed. A hub token comes only from a Secret reference (`spec.k8s.hub_token_secret`).

Spec strings reach the manifests only as YAML scalars written by the dumper (never through a shell:
containers get argument lists), and `spec.py` has already refused control characters and names that
are not Kubernetes names.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from llava_cluster import __version__
from llava_cluster.errors import UserError
from llava_cluster.rundir import PREEMPTED_EXIT, RunDir
from llava_cluster.spec import PATH_FIELDS, RunSpec

SPEC_MOUNT = "/etc/llava-cluster"
RUN_USER = 1000  # the `llava` user of docker/Dockerfile*
WAIT_FAILED_EXIT = 3  # the init container's "upstream stage failed": fail the Job, do not retry
FINISHED_TTL = 7 * 24 * 3600  # finished Jobs (and their logs) stay a week
UPSTREAM = {"merge": "train", "validate": "merge"}


def k8s_name(run: str, stage: str) -> str:
    """A DNS-1035 name for a run's object: PyTorchJob pods and Services are `<name>-worker-<i>`,
    so it must start with a letter, hold no dots and leave room for that suffix under 63 chars."""
    base = re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")
    if not base[:1].isalpha():
        base = f"r-{base}"
    return f"{base[:40].rstrip('-')}-{stage}"


def paths_outside_mount(spec: RunSpec) -> list[str]:
    """Spec paths a pod would not see: everything must live on the shared volume."""
    mount = PurePosixPath(spec.k8s.mount_path)
    fields = list(PATH_FIELDS)
    if spec.training.deepspeed.endswith(".json"):
        fields.append("training.deepspeed")
    outside = []
    for dotted in fields:
        section, _, attr = dotted.rpartition(".")
        value = getattr(getattr(spec, section) if section else spec, attr)
        if value and "://" not in value and not PurePosixPath(value).is_relative_to(mount):
            outside.append(f"{dotted}: {value}")
    return outside


def _labels(spec: RunSpec, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "llava-cluster",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/managed-by": "llava-cluster",
        "llava-cluster.io/run": spec.name,
    }


def _meta(spec: RunSpec, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": spec.k8s.namespace, "labels": _labels(spec, component)}


def _env(spec: RunSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    env += [{"name": k, "value": v} for k, v in spec.env.items()]
    if spec.k8s.hub_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": spec.k8s.hub_token_secret, "key": "HF_TOKEN"}}})
    return env


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _stage_args(spec: RunSpec, stage: str) -> list[str]:
    """Arguments for the image's entrypoint, which runs `llava-cluster stage <stage> ...`."""
    return [stage, "--run-dir", str(spec.run_dir), "--spec", f"{SPEC_MOUNT}/spec.yaml"]


def _memory(slurm_mem: str) -> str | None:
    """The spec's SLURM-style memory ("500G", "0" = whole node) as a Kubernetes quantity."""
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", slurm_mem.strip().upper())
    if not match or match.group(1) == "0":
        return None
    number, unit = match.groups()
    return f"{number}{unit or 'M'}i"


def _resources(spec: RunSpec, gpus: int) -> dict[str, Any]:
    requests: dict[str, str] = {"cpu": str(spec.resources.cpus_per_task)}
    memory = _memory(spec.resources.mem)
    if memory:
        requests["memory"] = memory
    resources: dict[str, Any] = {"requests": requests}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": str(gpus)}
    return resources


def _pod(spec: RunSpec, component: str, container: dict[str, Any],
         init: list[dict[str, Any]] | None = None, shm: bool = False) -> dict[str, Any]:
    """Pod template shared by every stage: security, volumes, scheduling hooks."""
    k = spec.k8s
    volumes: list[dict[str, Any]] = [
        {"name": "shared", "persistentVolumeClaim": {"claimName": k.claim}},
        {"name": "spec", "configMap": {"name": k8s_name(spec.name, "spec")}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "shared", "mountPath": k.mount_path},
        {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    common = {"image": k.image, "imagePullPolicy": "IfNotPresent", "env": _env(spec),
              "volumeMounts": mounts, "securityContext": _container_security()}
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": RUN_USER, "runAsGroup": RUN_USER, "fsGroup": RUN_USER,
            # a recursive chown of a large shared volume at every mount would take hours
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [{**container, **common}],
        "volumes": volumes,
    }
    if init:
        pod["initContainers"] = [{**c, **common} for c in init]
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    if k.node_selector:
        pod["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        pod["tolerations"] = [dict(t) for t in k.tolerations]
    return {"metadata": {"labels": _labels(spec, component)}, "spec": pod}


def _config_map(spec: RunSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(spec, k8s_name(spec.name, "spec"), "spec"),
            "data": {"spec.yaml": spec.to_yaml()}}


def _pytorchjob(spec: RunSpec) -> dict[str, Any]:
    """Multi-node (or multi-GPU) LoRA: the operator injects MASTER_*/PET_* and the stage starts
    torchrun with PET_NPROC_PER_NODE ranks on every pod."""
    gpus = spec.resources.gpus_per_node
    container = {"name": "pytorch", "args": _stage_args(spec, "train"),
                 "resources": _resources(spec, gpus)}

    def replicas(n: int) -> dict[str, Any]:
        # OnFailure: a failed rank restarts in place, every rank re-rendezvouses and resumes from
        # the last complete checkpoint; runPolicy.backoffLimit bounds the retries.
        return {"replicas": n, "restartPolicy": "OnFailure",
                "template": _pod(spec, "train", container, shm=True)}

    specs = {"Master": replicas(1)}
    if spec.resources.nodes > 1:
        specs["Worker"] = replicas(spec.resources.nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": _meta(spec, k8s_name(spec.name, "train"), "train"),
        "spec": {
            "nprocPerNode": str(gpus),
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3, "ttlSecondsAfterFinished": FINISHED_TTL},
            "pytorchReplicaSpecs": specs,
        },
    }


def _job(spec: RunSpec, stage: str, container: dict[str, Any], init: list[dict[str, Any]] | None,
         shm: bool, failure_rules: list[dict[str, Any]]) -> dict[str, Any]:
    template = _pod(spec, stage, container, init=init, shm=shm)
    template["spec"]["restartPolicy"] = "Never"  # required by podFailurePolicy
    rules = failure_rules + [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta(spec, k8s_name(spec.name, stage), stage),
        "spec": {"backoffLimit": 2, "ttlSecondsAfterFinished": FINISHED_TTL,
                 "podFailurePolicy": {"rules": rules}, "template": template},
    }


def _qlora_job(spec: RunSpec) -> dict[str, Any]:
    """Single-node QLoRA: no PyTorchJob needed; the stage starts `gpus_per_node` ranks itself."""
    gpus = spec.resources.gpus_per_node
    container = {"name": "train", "args": _stage_args(spec, "train"),
                 "resources": _resources(spec, gpus)}
    # Preempted after a complete checkpoint (exit 75): a new pod resumes; not counted as a failure.
    rules = [{"action": "Ignore", "onExitCodes": {"containerName": "train", "operator": "In",
                                                  "values": [PREEMPTED_EXIT]}}]
    return _job(spec, "train", container, None, shm=True, failure_rules=rules)


def _post_train_job(spec: RunSpec, stage: str) -> dict[str, Any]:
    upstream = UPSTREAM[stage]
    waiter = {"name": f"wait-for-{upstream}",
              "args": ["python", "-m", "llava_cluster.launch.k8s", "wait", upstream, "--run-dir", str(spec.run_dir)],
              "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}}}
    gpus = 1 if stage == "validate" else 0
    container = {"name": stage, "args": _stage_args(spec, stage),
                 "resources": _resources(spec, gpus)}
    rules = [{"action": "FailJob", "onExitCodes": {"containerName": waiter["name"], "operator": "In",
                                                   "values": [WAIT_FAILED_EXIT]}}]
    return _job(spec, stage, container, [waiter], shm=gpus > 0, failure_rules=rules)


def render(spec: RunSpec, stages: list[str]) -> list[dict[str, Any]]:
    """The manifests for `stages` of the run, in apply order: the spec ConfigMap, then one workload
    per stage. Pure: reads nothing, writes nothing."""
    unknown = [s for s in stages if s not in ("train", *UPSTREAM)]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; stages are train, merge, validate")
    docs = [_config_map(spec)]
    if "train" in stages:
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
    refs = [f"{d['kind'].lower()}/{d['metadata']['name']}" for d in docs if d["kind"] != "ConfigMap"]
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


def wait_for_stage(run_dir: Path, stage: str, poll: float, grace: float) -> int:
    """Block until `stage` succeeded (0). A failure is final (WAIT_FAILED_EXIT) only once it has
    stood for `grace` seconds: a stale failure from an earlier submission, or a rank that its
    restart policy restarts, turns the state back to running within that time."""
    rd = RunDir(run_dir)
    failed_since: float | None = None
    seen: tuple[str, int] | None = None
    while True:
        try:
            state = rd.read_state(stage)
        except (OSError, ValueError):
            state = None  # unreadable for a moment (shared file systems): look again
        if state is not None:
            if state.status == "succeeded":
                print(f"{stage} succeeded", flush=True)
                return 0
            now = time.monotonic()
            current = (state.status, state.attempts)
            if state.status in ("failed", "cancelled"):
                if current != seen:
                    failed_since = now
                    print(f"{stage} {state.status} (attempt {state.attempts}): waiting {grace:.0f}s for a "
                          f"retry before giving up", flush=True)
                elif failed_since is not None and now - failed_since >= grace:
                    print(f"{stage} {state.status}: {state.error or 'no error recorded'}", file=sys.stderr)
                    return WAIT_FAILED_EXIT
            seen = current
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_cluster.launch.k8s",
        description="Init-container helper of the merge and validate Jobs: wait until a stage of the "
                    "run succeeded (exit 0), or fail (exit 3) when it stays failed.",
        epilog="example:\n  python -m llava_cluster.launch.k8s wait train --run-dir /shared/runs/my-run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait", help="wait for a stage of a run to succeed")
    wait.add_argument("stage", choices=("train", "merge", "validate"))
    wait.add_argument("--run-dir", required=True, type=Path)
    wait.add_argument("--poll", type=float, default=30.0, help="seconds between reads (default 30)")
    wait.add_argument("--grace", type=float, default=1800.0,
                      help="seconds a failure must stand before it is final (default 1800)")
    args = parser.parse_args(argv)
    return wait_for_stage(args.run_dir, args.stage, args.poll, args.grace)


if __name__ == "__main__":
    sys.exit(main())
