"""Offline checks of Kubernetes manifests, shared by the render and kustomize tests.

Core kinds go through kubernetes-validate (strict: unknown fields fail); a PyTorchJob, TrainJob or
TrainingRuntime goes through its CRD's OpenAPI schema (../shared/k8s-schemas; Trainer v2.3.0 in
trainer-v2/), made strict the same way: `kubectl apply` validates fields strictly on the server, so a
misspelt field must fail here too.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from llava_cluster.launch.k8s_pod import GANG_SCHEDULERS, QUEUE_LABEL
from llava_cluster.launch.k8s_wait import WAIT_FAILED_EXIT, waiter_args
from llava_cluster.rundir import PREEMPTED_EXIT

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO.parent / "shared" / "k8s-schemas"
CRDS = {"PyTorchJob": (SCHEMAS / "kubeflow.org_pytorchjobs.yaml", "v1"),
        "TrainJob": (SCHEMAS / "trainer-v2" / "trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"),
        "TrainingRuntime": (SCHEMAS / "trainer-v2" / "trainer.kubeflow.org_trainingruntimes.yaml", "v1alpha1")}
K8S_VERSION = "1.31"  # the API level of the PyTorchJob CRD we validate against
WORKLOADS = ("PyTorchJob", "TrainJob", "Job")  # the kinds that run pods
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def _strict(schema: Any) -> Any:
    """Forbid unknown properties wherever the schema lists its properties and allows nothing else."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_validator(kind: str) -> jsonschema.protocols.Validator:
    path, version = CRDS[kind]
    crd = yaml.safe_load(path.read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(served["schema"]["openAPIV3Schema"])
    # apiVersion/kind/metadata are checked by the API server itself, not by the CRD schema
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict[str, Any]) -> None:
    if doc["kind"] in CRDS:
        path, version = CRDS[doc["kind"]]
        if not path.is_file():
            pytest.skip(f"{doc['kind']} CRD schema not found at {path} (../shared/k8s-schemas next to the repo)")
        assert doc["apiVersion"].endswith(f"/{version}")
        errors = sorted(_crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])
        # the TrainJob CRD's CEL rule (not JSON schema): a DNS-1035 name of at most 63 characters
        assert DNS_1035.fullmatch(doc["metadata"]["name"]), doc["metadata"]["name"]
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] == "TrainingRuntime":
        return [r["template"]["spec"]["template"] for r in doc["spec"]["template"]["spec"]["replicatedJobs"]]
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]]
    return []


def by_component(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ConfigMap and the workload of each stage (the TrainJob, not its runtime)."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs
            if d["kind"] in (*WORKLOADS, "ConfigMap")}


def runtime_of(docs: list[dict[str, Any]], train_job: dict[str, Any]) -> dict[str, Any]:
    ref = train_job["spec"]["runtimeRef"]
    (runtime,) = [d for d in docs if d["kind"] == ref["kind"] and d["metadata"]["name"] == ref["name"]]
    assert ref["apiGroup"] == "trainer.kubeflow.org" and runtime["metadata"]["namespace"] == train_job["metadata"]["namespace"]
    return runtime


def _suspended(doc: dict[str, Any]) -> bool:
    spec = doc["spec"]["runPolicy"] if doc["kind"] == "PyTorchJob" else doc["spec"]
    return spec.get("suspend", False)


def assert_policy(docs: list[dict[str, Any]], spec: Any) -> None:
    """Security context, /dev/shm, PVC, GPU limits, secrets by reference, Kueue queue and gang
    settings, merge/validate ordering, for either API."""
    k = spec.k8s
    gpus_per_node = spec.resources.gpus_per_node
    stages = by_component(docs)
    for doc in docs:
        for template in pod_templates(doc):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            assert {"name": "shared", "persistentVolumeClaim": {"claimName": k.claim}} in pod["volumes"]
            assert pod.get("priorityClassName") == k.priority_class
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert sc["readOnlyRootFilesystem"] is True
                assert {"name": "shared", "mountPath": k.mount_path} in c["volumeMounts"]
                for env in c.get("env", []):
                    assert "TOKEN" not in env["name"] or "secretKeyRef" in env.get("valueFrom", {}), env
        # Kueue: every object that runs pods carries the queue and starts suspended; nothing else does
        labelled = doc["metadata"]["labels"].get(QUEUE_LABEL)
        if doc["kind"] in WORKLOADS:
            assert labelled == k.queue and _suspended(doc) is (k.queue is not None), doc["metadata"]["name"]
        else:
            assert labelled is None
    train = stages["train"]
    train_templates = pod_templates(runtime_of(docs, train) if train["kind"] == "TrainJob" else train)
    for template in train_templates:
        pod = template["spec"]
        (main,) = pod["containers"]
        if train["kind"] != "TrainJob":
            assert main["resources"]["limits"]["nvidia.com/gpu"] == str(gpus_per_node)
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": k.shm_size}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in main["volumeMounts"]
        assert pod.get("schedulerName") == (GANG_SCHEDULERS[k.gang] if k.gang else None)
    if train["kind"] == "TrainJob":
        trainer = train["spec"]["trainer"]
        assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(gpus_per_node)
        assert trainer["numProcPerNode"] == gpus_per_node
        assert trainer["numNodes"] == (1 if spec.method == "qlora" else spec.resources.nodes)
        runtime = runtime_of(docs, train)["spec"]
        (node,) = runtime["template"]["spec"]["replicatedJobs"]
        assert node["name"] == "node" and [c["name"] for c in train_templates[0]["spec"]["containers"]] == ["node"]
        assert {"action": "Ignore", "onExitCodes": {"containerName": "node", "operator": "In",
                                                    "values": [PREEMPTED_EXIT]}} in node["template"]["spec"]["podFailurePolicy"]["rules"]
        assert ("podGroupPolicy" in runtime) is (k.gang is not None)
    elif train["kind"] == "PyTorchJob":
        assert train["spec"]["nprocPerNode"] == str(gpus_per_node)
        assert {r["template"]["spec"]["containers"][0]["name"] for r in
                train["spec"]["pytorchReplicaSpecs"].values()} == {"pytorch"}
        gang = train["spec"]["runPolicy"].get("schedulingPolicy")
        assert gang == ({"minAvailable": spec.resources.nodes, **({"priorityClass": k.priority_class}
                                                                   if k.priority_class else {})}
                        if k.gang else None)
    else:
        rules = train["spec"]["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onExitCodes": {"containerName": "train", "operator": "In",
                                                    "values": [PREEMPTED_EXIT]}} in rules
    for stage, upstream in (("merge", "train"), ("validate", "merge")):
        job = stages[stage]["spec"]
        (init,) = job["template"]["spec"]["initContainers"]
        assert init["args"] == waiter_args(upstream, spec.run_dir)
        assert init["args"][:4] == ["python", "-m", "llava_cluster.launch.k8s_wait", upstream]
        assert {"action": "FailJob", "onExitCodes": {"containerName": init["name"], "operator": "In",
                                                     "values": [WAIT_FAILED_EXIT]}} in job["podFailurePolicy"]["rules"]
        assert job["template"]["spec"]["restartPolicy"] == "Never"
        assert "schedulerName" not in job["template"]["spec"]  # one pod: no gang to wait for
    assert "nvidia.com/gpu" not in stages["merge"]["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    assert stages["validate"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
