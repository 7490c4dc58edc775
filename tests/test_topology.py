"""launch/topology.py maps each launcher's environment: Kubeflow Trainer v2 (PET_* only), the
training operator v1 (MASTER_* + PET_*), SLURM, or nothing."""

from __future__ import annotations

import pytest

from llava_cluster.errors import UserError
from llava_cluster.launch.topology import NodeLaunch, node_launch, rank_env, torchrun_argv

# exactly what Trainer v2.3.0's torch plugin injects into container `node` of TrainJob `tj`, node 1 of 2
TRAINER_V2 = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1",
              "PET_MASTER_ADDR": "tj-node-0-0.tj", "PET_MASTER_PORT": "29500"}


def test_trainer_v2_env_is_one_node_of_the_run_that_starts_its_ranks():
    assert rank_env(TRAINER_V2) is None  # no RANK/WORLD_SIZE: this pod must start its ranks
    launch = node_launch(8, TRAINER_V2)
    assert launch == NodeLaunch(nnodes=2, nproc_per_node=4, node_rank=1, master_addr="tj-node-0-0.tj",
                                master_port=29500)
    assert torchrun_argv(launch, ["train"])[3:8] == ["--nproc-per-node=4", "--nnodes=2", "--node-rank=1",
                                                     "--master-addr=tj-node-0-0.tj", "--master-port=29500"]


def test_trainer_v2_auto_procs_per_node_are_the_specs_gpus():
    assert node_launch(8, {**TRAINER_V2, "PET_NPROC_PER_NODE": "auto"}).nproc_per_node == 8


def test_pytorchjob_env_still_maps_its_master_variables():
    env = {"MASTER_ADDR": "run-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1",
           "PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1"}
    assert node_launch(8, env) == NodeLaunch(2, 8, 1, "run-master-0", 23456)


def test_pet_variables_without_a_master_address_are_a_user_error():
    env = {k: v for k, v in TRAINER_V2.items() if k != "PET_MASTER_ADDR"}
    with pytest.raises(UserError, match="PET_MASTER_ADDR"):
        node_launch(8, env)


def test_the_node_parent_of_a_trainjobs_second_node_is_not_rank_0(monkeypatch):
    """Trainer v2 gives the node parent no RANK: its node rank decides who writes shared files
    (spec.yaml, the stage's failure record) before torchrun starts the ranks."""
    from llava_cluster.rundir import global_rank, is_rank0

    for key in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in TRAINER_V2.items():
        monkeypatch.setenv(key, value)
    assert global_rank() != 0 and not is_rank0()
    monkeypatch.setenv("PET_NODE_RANK", "0")
    assert is_rank0()
    monkeypatch.setenv("RANK", "5")  # a torchrun child of node 0: its own rank counts
    assert global_rank() == 5


def test_a_one_node_trainjob_rendezvouses_on_loopback():
    """QLoRA under Trainer v2: one node whose PET_MASTER_ADDR is the pod's own DNS name."""
    launch = node_launch(4, {**TRAINER_V2, "PET_NNODES": "1", "PET_NODE_RANK": "0"})
    argv = torchrun_argv(launch, ["stage", "train"])
    assert "--standalone" in argv and not any(a.startswith("--master-addr") for a in argv)
