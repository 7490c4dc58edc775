"""The kustomize tree (k8s/): every overlay renders with `kubectl kustomize`, validates offline,
follows the pod policy, and holds exactly what `submit --backend k8s` would apply for its run.yaml
(in that order). The overlays are the two example runs under each API: `<run>` Kubeflow Trainer v2,
`<run>-v1` the training operator v1.

After changing the launcher or a run.yaml: `python tests/test_k8s_kustomize.py --regenerate`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from k8s_checks import REPO, assert_policy, validate

from llava_cluster.launch import k8s
from llava_cluster.spec import K8sSpec, load_spec, spec_from_dict

OVERLAYS = REPO / "k8s" / "overlays"
STAGES = ["train", "merge", "validate"]
HEADER = ("# Generated from run.yaml by `python tests/test_k8s_kustomize.py --regenerate`: the workloads that\n"
          "# `llava-cluster submit run.yaml --backend k8s` applies (the ConfigMap comes from kustomization.yaml).\n")


def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not on PATH")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return list(yaml.safe_load_all(out.stdout))


def test_base_renders_the_shared_rwx_volume():
    docs = kustomize(REPO / "k8s" / "base")
    for doc in docs:
        validate(doc)
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == K8sSpec().claim
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", sorted(p.name for p in OVERLAYS.iterdir()))
def test_overlay_renders_validates_and_equals_what_submit_applies(overlay):
    spec = load_spec(OVERLAYS / overlay / "run.yaml")
    docs = kustomize(OVERLAYS / overlay)
    for doc in docs:
        validate(doc)
    assert_policy(docs, spec)
    rendered = k8s.render(spec, STAGES)
    workloads = [d for d in docs if d["kind"] not in ("ConfigMap", "PersistentVolumeClaim", "ServiceAccount")]
    assert workloads == rendered[1:]  # the same objects in the same order (the runtime before its TrainJob)
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config_map["metadata"] == rendered[0]["metadata"]
    assert spec_from_dict(yaml.safe_load(config_map["data"]["spec.yaml"])).digest() == spec.digest()
    train_kinds = {"trainer-v2": ["TrainingRuntime", "TrainJob"],
                   "pytorchjob": ["PyTorchJob"] if spec.method == "lora" else []}[spec.k8s.api]
    assert {d["kind"] for d in docs} == {"ConfigMap", "PersistentVolumeClaim", "ServiceAccount", "Job", *train_kinds}


def test_every_example_run_has_an_overlay_under_each_api():
    apis = {(o.name, load_spec(o / "run.yaml").k8s.api) for o in OVERLAYS.iterdir()}
    assert apis == {("lora-multinode", "trainer-v2"), ("qlora-1node", "trainer-v2"),
                    ("lora-multinode-v1", "pytorchjob"), ("qlora-1node-v1", "pytorchjob")}


@pytest.mark.parametrize("overlay, job", [("lora-multinode", "lora-13b-multinode"), ("qlora-1node", "qlora-13b-1node"),
                                          ("lora-multinode-v1", "lora-13b-multinode"),
                                          ("qlora-1node-v1", "qlora-13b-1node")])
def test_overlay_run_is_the_example_job_spec_with_a_k8s_section(overlay, job):
    def run_only(path: Path) -> dict:
        data = load_spec(path).to_dict()
        return {k: v for k, v in data.items() if k not in ("slurm", "k8s")}

    assert run_only(OVERLAYS / overlay / "run.yaml") == run_only(REPO / "jobs" / f"{job}.yaml")


def regenerate() -> None:
    for overlay in sorted(OVERLAYS.iterdir()):
        text = HEADER + k8s.to_yaml(k8s.render(load_spec(overlay / "run.yaml"), STAGES)[1:])
        (overlay / "manifests.yaml").write_text(text)
        print(f"wrote {overlay / 'manifests.yaml'}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: python {sys.argv[0]} --regenerate")
    regenerate()
