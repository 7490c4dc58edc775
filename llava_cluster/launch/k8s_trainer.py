"""The train stage under Kubeflow Trainer v2 (`trainer.kubeflow.org/v1alpha1`): a TrainJob and the
namespaced TrainingRuntime it references.

    TrainingRuntime  <run>-runtime   the pod: container `node` (our image, env, the shared volume,
                                     memory-backed /dev/shm, the pod policy of k8s_pod), one
                                     replicated Job `node` that Trainer's torch plugin sizes and
                                     fills with PET_* (read by launch/topology.py)
    TrainJob         <run>-train     the run's size: numNodes = nodes, numProcPerNode = GPUs per
                                     node (QLoRA: one node), resources per node, the stage arguments

The runtime is per run because its pods mount the run's spec ConfigMap. A failed pod fails its Job
(backoffLimit 0) and JobSet restarts every node (failurePolicy.maxRestarts): all ranks
re-rendezvous and resume from the last complete checkpoint, as a PyTorchJob's OnFailure does. A
rank preempted after a complete checkpoint (exit 75) and an evicted pod are replaced without
counting. Under Kueue (`k8s.queue`) the TrainJob is created suspended with the queue label; Kueue
admits all its pods at once. `k8s.gang` adds the runtime's podGroupPolicy for Volcano or the
coscheduling plugin instead.

With `k8s.runtime_ref` the TrainJob references a ClusterTrainingRuntime the admin installed (e.g.
Trainer's `torch-distributed`) and carries our image, arguments and env in `trainer`, and the pod
policy in `runtimePatches`, as far as Trainer v2.3 lets a patch reach: the pod and container security
contexts, the volumes and mounts, node selector, tolerations and ServiceAccount. The rest (token
automount, restart and failure policy, PriorityClass, gang) is the admin's runtime's: run its pods
under the `llava-cluster` ServiceAccount of k8s/base (`k8s.service_account`), which mounts no token.
"""

from __future__ import annotations

from typing import Any

from llava_cluster.launch.k8s_pod import TRAIN_RESTARTS, k8s_name, meta, pod, queued, resources, stage_args
from llava_cluster.rundir import PREEMPTED_EXIT
from llava_cluster.spec import RunSpec

API_VERSION = "trainer.kubeflow.org/v1alpha1"
TRAINER_CONTAINER = "node"  # the container Trainer's torch plugin injects PET_* into
# marks the replicated Job that the TrainJob's `trainer` settings (nodes, resources, args) apply to
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
GANG_TIMEOUT = 600  # seconds the coscheduling plugin waits for the whole gang before giving up
PATCH_MANAGER = "llava-cluster.io/submit"
# what a v2.3 runtimePatch may set on a pod and on its containers (the TrainJob CRD's schema)
PATCHABLE_POD = ("securityContext", "volumes", "nodeSelector", "tolerations", "serviceAccountName")
PATCHABLE_CONTAINER = ("name", "volumeMounts", "securityContext")


def _pod_group_policy(gang: str) -> dict[str, Any]:
    if gang == "volcano":
        return {"volcano": {}}
    return {"coscheduling": {"scheduleTimeoutSeconds": GANG_TIMEOUT}}


def _node_pod(spec: RunSpec) -> dict[str, Any]:
    return pod(spec, "train", {"name": TRAINER_CONTAINER}, shm=True, gang=True)


def training_runtime(spec: RunSpec) -> dict[str, Any]:
    template = _node_pod(spec)
    template["spec"]["restartPolicy"] = "Never"  # required by podFailurePolicy
    rules = [
        {"action": "Ignore", "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In",
                                             "values": [PREEMPTED_EXIT]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
    job = {"backoffLimit": 0, "podFailurePolicy": {"rules": rules}, "template": template}
    runtime_spec: dict[str, Any] = {"mlPolicy": {"torch": {}}}
    if spec.k8s.gang:
        runtime_spec["podGroupPolicy"] = _pod_group_policy(spec.k8s.gang)
    runtime_spec["template"] = {"spec": {
        "failurePolicy": {"maxRestarts": TRAIN_RESTARTS},
        "replicatedJobs": [{"name": "node", "template": {
            "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}}, "spec": job}}],
    }}
    obj_meta = meta(spec, k8s_name(spec.name, "runtime"), "train")
    obj_meta["labels"]["trainer.kubeflow.org/framework"] = "torch"
    return {"apiVersion": API_VERSION, "kind": "TrainingRuntime", "metadata": obj_meta, "spec": runtime_spec}


def _runtime_patch(spec: RunSpec) -> dict[str, Any]:
    """Our pod policy as a patch of the admin's runtime's `node` replicated Job."""
    template = _node_pod(spec)
    pod_spec = template["spec"]
    (container,) = pod_spec["containers"]
    patch_pod = {k: v for k, v in pod_spec.items() if k in PATCHABLE_POD}
    patch_pod["containers"] = [{k: v for k, v in container.items() if k in PATCHABLE_CONTAINER}]
    return {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": "node", "template": {"spec": {"template": {"metadata": template["metadata"], "spec": patch_pod}}}}]}}}}


def train_job(spec: RunSpec) -> dict[str, Any]:
    nodes = 1 if spec.method == "qlora" else spec.resources.nodes
    gpus = spec.resources.gpus_per_node
    trainer: dict[str, Any] = {"args": stage_args(spec, "train"), "numNodes": nodes, "numProcPerNode": gpus,
                               "resourcesPerNode": resources(spec, gpus)}
    if spec.k8s.runtime_ref:
        (container,) = _node_pod(spec)["spec"]["containers"]
        job_spec: dict[str, Any] = {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                           "name": spec.k8s.runtime_ref},
            "trainer": {"image": container["image"], **trainer, "env": container["env"]},
            "runtimePatches": [_runtime_patch(spec)],
        }
    else:
        job_spec = {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                   "name": k8s_name(spec.name, "runtime")},
                    "trainer": trainer}
    if queued(spec):
        job_spec["suspend"] = True
    return {"apiVersion": API_VERSION, "kind": "TrainJob",
            "metadata": meta(spec, k8s_name(spec.name, "train"), "train", workload=True), "spec": job_spec}


def train_stage(spec: RunSpec) -> list[dict[str, Any]]:
    """The runtime first: the TrainJob's admission checks that the runtime it names exists."""
    if spec.k8s.runtime_ref:
        return [train_job(spec)]
    return [training_runtime(spec), train_job(spec)]

