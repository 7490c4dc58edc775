"""The pieces every Kubernetes manifest of a run shares, whichever API runs the train stage:
object names and labels, the pod template (security, volumes, scheduling hooks), resources, and the
Kueue / gang-scheduling settings.

Every pod runs as a non-root user without privilege escalation, with all capabilities dropped, the
RuntimeDefault seccomp profile and a read-only root filesystem (HOME and caches live on /tmp); the
shared volume is the claim `spec.k8s.claim` mounted at `spec.k8s.mount_path`, /dev/shm is
memory-backed. A hub token comes only from a Secret reference (`spec.k8s.hub_token_secret`).
"""

from __future__ import annotations

import re
from typing import Any

from llava_cluster import __version__
from llava_cluster.spec import RunSpec
from llava_cluster.stage import stage_argv

SPEC_MOUNT = "/etc/llava-cluster"
RUN_USER = 1000  # the `llava` user of docker/Dockerfile*
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The scheduler that places a gang's pods: Volcano's own, or the scheduler-plugins deployment that
# carries the coscheduling plugin (its name in the scheduler-plugins and Kubeflow install manifests).
# Restarts of the whole train stage after a failure (every rank re-rendezvouses and resumes from
# the last complete checkpoint): the PyTorchJob's backoffLimit, the JobSet's maxRestarts.
TRAIN_RESTARTS = 3
GANG_SCHEDULERS = {"volcano": "volcano", "coscheduling": "scheduler-plugins-scheduler"}


def k8s_name(run: str, stage: str) -> str:
    """A DNS-1035 name for a run's object: PyTorchJob pods are `<name>-worker-<i>`, TrainJob pods
    `<name>-node-0-<i>-<suffix>`, so it must start with a letter, hold no dots and leave room for
    those suffixes under 63 chars."""
    base = re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")
    if not base[:1].isalpha():
        base = f"r-{base}"
    return f"{base[:40].rstrip('-')}-{stage}"


def labels(spec: RunSpec, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "llava-cluster",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/managed-by": "llava-cluster",
        "llava-cluster.io/run": spec.name,
    }


def meta(spec: RunSpec, name: str, component: str, workload: bool = False) -> dict[str, Any]:
    """Object metadata; a workload (an object that runs pods) carries the Kueue queue label when
    `k8s.queue` is set, which is what makes Kueue manage it."""
    obj_labels = labels(spec, component)
    if workload and spec.k8s.queue:
        obj_labels[QUEUE_LABEL] = spec.k8s.queue
    return {"name": name, "namespace": spec.k8s.namespace, "labels": obj_labels}


def queued(spec: RunSpec) -> bool:
    """Kueue starts a workload by un-suspending it: created suspended, it holds no pods until the
    queue admits all of it at once."""
    return spec.k8s.queue is not None


def env(spec: RunSpec) -> list[dict[str, Any]]:
    variables: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    variables += [{"name": k, "value": v} for k, v in spec.env.items()]
    if spec.k8s.hub_token_secret:
        variables.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": spec.k8s.hub_token_secret, "key": "HF_TOKEN"}}})
    return variables


def container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def stage_args(spec: RunSpec, stage: str) -> list[str]:
    """Arguments for the image's entrypoint, which puts `llava-cluster stage` before them."""
    _stage_command, *args = stage_argv(stage, spec.run_dir, f"{SPEC_MOUNT}/spec.yaml")
    return args


def _memory(slurm_mem: str) -> str | None:
    """The spec's SLURM-style memory ("500G", "0" = whole node) as a Kubernetes quantity."""
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", slurm_mem.strip().upper())
    if not match or match.group(1) == "0":
        return None
    number, unit = match.groups()
    return f"{number}{unit or 'M'}i"


def resources(spec: RunSpec, gpus: int) -> dict[str, Any]:
    requests: dict[str, str] = {"cpu": str(spec.resources.cpus_per_task)}
    memory = _memory(spec.resources.mem)
    if memory:
        requests["memory"] = memory
    out: dict[str, Any] = {"requests": requests}
    if gpus:
        out["limits"] = {"nvidia.com/gpu": str(gpus)}
    return out


def pod(spec: RunSpec, component: str, container: dict[str, Any],
        init: list[dict[str, Any]] | None = None, shm: bool = False, gang: bool = False) -> dict[str, Any]:
    """Pod template shared by every stage: security, volumes, scheduling hooks. `gang`: the pod is
    one of the train stage's, placed by the gang scheduler when `k8s.gang` names one."""
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
    common = {"image": k.image, "imagePullPolicy": "IfNotPresent", "env": env(spec),
              "volumeMounts": mounts, "securityContext": container_security()}
    spec_: dict[str, Any] = {
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
        spec_["initContainers"] = [{**c, **common} for c in init]
    if k.service_account:
        spec_["serviceAccountName"] = k.service_account
    if k.priority_class:
        spec_["priorityClassName"] = k.priority_class
    if gang and k.gang:
        spec_["schedulerName"] = GANG_SCHEDULERS[k.gang]
    if k.node_selector:
        spec_["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        spec_["tolerations"] = [dict(t) for t in k.tolerations]
    return {"metadata": {"labels": labels(spec, component)}, "spec": spec_}
