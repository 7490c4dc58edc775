"""The image's entrypoint under each Kubernetes API: two local "pods" (one rank each) get exactly the
environment the launcher injects — Kubeflow Trainer v2 into container `node` of a TrainJob (PET_*
only), or the training operator v1 into a PyTorchJob's Master and Worker (MASTER_* + PET_*) — run
docker/entrypoint.sh with the arguments the rendered manifest gives that container, rendezvous, and
train the tiny model under ZeRO-3 on CPU to completion with one copy of each artifact."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from k8s_checks import REPO, by_component, pod_templates, runtime_of

from llava_cluster.launch import k8s
from llava_cluster.launch.k8s_pod import SPEC_MOUNT
from llava_cluster.spec import spec_from_dict

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher_env(api: str, rank: int, port: int) -> dict[str, str]:
    """What each launcher sets for 2 nodes of 1 process (the master's address is this machine)."""
    if api == "trainer-v2":  # Trainer v2.3.0's torch plugin, into container `node`
        return {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
                "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
    # the training operator for replicas Master:1 + Worker:1 with nprocPerNode "1"
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
            "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank)}


def _train_container_args(spec: dict, api: str, spec_file: Path) -> list[str]:
    """The rendered train container's name and arguments, the spec mount pointed at `spec_file`."""
    docs = k8s.render(spec_from_dict({**spec, "k8s": {"api": api}}), ["train"])
    workload = by_component(docs)["train"]
    if api == "trainer-v2":
        (container,) = pod_templates(runtime_of(docs, workload))[0]["spec"]["containers"]
        assert container["name"] == "node"  # where Trainer v2 injects PET_*
        args = workload["spec"]["trainer"]["args"]
    else:
        (container,) = pod_templates(workload)[0]["spec"]["containers"]
        args = container["args"]
    return [str(spec_file) if a == f"{SPEC_MOUNT}/spec.yaml" else a for a in args]


@pytest.mark.parametrize("api", ["trainer-v2", "pytorchjob"])
def test_two_pods_get_the_launchers_env_and_train_zero3_to_completion(tiny_dir, tmp_path, api):
    from safetensors import safe_open

    ds = json.loads((REPO / "llava_cluster" / "train" / "deepspeed_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    spec = {
        "name": f"tiny-{api}", "storage": str(tmp_path / "shared"),
        "model": {"base": str(tiny_dir.model)},
        "data": {"train": str(tiny_dir.train), "image_folder": str(tiny_dir.images), "max_length": 128,
                 "num_workers": 0},
        "lora": {"r": 8, "alpha": 16},
        "optim": {"max_steps": 2, "per_device_batch": 2, "lr": 1e-3},
        "training": {"deepspeed": str(tmp_path / "zero3.json"), "precision": "fp32",
                     "gradient_checkpointing": False, "save_steps": 1000, "logging_steps": 1},
        "resources": {"nodes": 2, "gpus_per_node": 1},
    }
    spec_file = tmp_path / "configmap" / "spec.yaml"  # the ConfigMap mount of the manifests
    spec_file.parent.mkdir()
    spec_file.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "shared" / "runs" / f"tiny-{api}"
    args = _train_container_args(spec, api, spec_file)
    assert args == ["train", "--run-dir", str(run_dir), "--spec", str(spec_file)]

    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT") and not k.startswith("PET_")}
    base.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = [subprocess.Popen(["bash", str(REPO / "docker" / "entrypoint.sh"), *args],
                              env={**base, **_launcher_env(api, rank, port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = []
    try:
        outputs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-4000:] for o in outputs)

    state = json.loads((run_dir / "state" / "train.json").read_text())
    assert state["status"] == "succeeded" and state["attempts"] == 1
    assert yaml.safe_load((run_dir / "spec.yaml").read_text())["name"] == f"tiny-{api}"
    # written once, by global rank 0 into the run directory: no second copy from the Worker "node"
    adapters = [p.relative_to(run_dir / "train") for p in tmp_path.rglob("adapter_model.safetensors")]
    assert [p for p in adapters if p.parts[0] == "final"] == [Path("final/adapter_model.safetensors")]
    assert all(p.parts[0] == "final" or p.parts[0].startswith("checkpoint-") for p in adapters), adapters
    final = run_dir / "train" / "final"
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        with safe_open(final / name, "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        assert shapes and all(0 not in s and len(s) > 0 for s in shapes.values()), (name, shapes)
