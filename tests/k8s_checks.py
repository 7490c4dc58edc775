"""Offline checks of Kubernetes manifests, shared by the render and kustomize tests.

Core kinds go through kubernetes-validate (strict: unknown fields fail); a PyTorchJob goes through
the CRD's OpenAPI schema (../shared/k8s-schemas), made strict the same way: `kubectl apply` validates
fields strictly on the server, so a misspelt field must fail here too.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from llava_cluster.launch.k8s import PREEMPTED_EXIT, WAIT_FAILED_EXIT

REPO = Path(__file__).resolve().parents[1]
CRD = REPO.parent / "shared" / "k8s-schemas" / "kubeflow.org_pytorchjobs.yaml"
K8S_VERSION = "1.31"  # the API level of the PyTorchJob CRD we validate against


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
def _pytorchjob_validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # apiVersion/kind/metadata are checked by the API server itself, not by the CRD schema
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def validate(doc: dict[str, Any]) -> None:
    if doc["kind"] == "PyTorchJob":
        if not CRD.is_file():
            pytest.skip(f"PyTorchJob CRD schema not found at {CRD} (../shared/k8s-schemas next to the repo)")
        errors = sorted(_pytorchjob_validator().iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]]
    return []


def by_component(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs
            if d["kind"] in ("PyTorchJob", "Job", "ConfigMap")}


def assert_policy(docs: list[dict[str, Any]], gpus_per_node: int, shm_size: str) -> None:
    """Security context, /dev/shm, GPU limits, secrets by reference, merge/validate ordering."""
    stages = by_component(docs)
    for doc in docs:
        for template in pod_templates(doc):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert sc["readOnlyRootFilesystem"] is True
                for env in c.get("env", []):
                    assert "TOKEN" not in env["name"] or "secretKeyRef" in env.get("valueFrom", {}), env
    train = stages["train"]
    for template in pod_templates(train):
        pod = template["spec"]
        (main,) = pod["containers"]
        assert main["resources"]["limits"]["nvidia.com/gpu"] == str(gpus_per_node)
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": shm_size}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in main["volumeMounts"]
    if train["kind"] == "PyTorchJob":
        assert train["spec"]["nprocPerNode"] == str(gpus_per_node)
        assert {r["template"]["spec"]["containers"][0]["name"] for r in
                train["spec"]["pytorchReplicaSpecs"].values()} == {"pytorch"}
    else:
        rules = train["spec"]["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onExitCodes": {"containerName": "train", "operator": "In",
                                                    "values": [PREEMPTED_EXIT]}} in rules
    for stage, upstream in (("merge", "train"), ("validate", "merge")):
        job = stages[stage]["spec"]
        (init,) = job["template"]["spec"]["initContainers"]
        assert init["args"][:5] == ["python", "-m", "llava_cluster.launch.k8s", "wait", upstream]
        assert {"action": "FailJob", "onExitCodes": {"containerName": init["name"], "operator": "In",
                                                     "values": [WAIT_FAILED_EXIT]}} in job["podFailurePolicy"]["rules"]
        assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert "nvidia.com/gpu" not in stages["merge"]["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    assert stages["validate"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
