"""launch/topology.py maps each launcher's environment: Kubeflow Trainer v2 (PET_* only), the
training operator v1 (MASTER_* + PET_*), SLURM (srun tasks, one task per node), torchrun's children,
or nothing; and who is rank 0. Pure functions of an env dict: every case is a dict here."""

from __future__ import annotations

import shutil
import sys

import pytest

from llava_cluster.errors import UserError
from llava_cluster.launch.topology import (
    DEFAULT_PORT,
    RANK_VARIABLES,
    NodeLaunch,
    first_slurm_host,
    global_rank,
    is_rank0,
    node_launch,
    rank_env,
    slurm_port,
    torchrun_argv,
)

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
    from llava_cluster.rundir import is_rank0 as rundirs_is_rank0

    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in TRAINER_V2.items():
        monkeypatch.setenv(key, value)
    assert global_rank() == 1 and not is_rank0() and not rundirs_is_rank0()  # the run directory asks the same
    monkeypatch.setenv("PET_NODE_RANK", "0")
    assert is_rank0() and rundirs_is_rank0()
    monkeypatch.setenv("RANK", "5")  # a torchrun child of node 0: its own rank counts
    assert global_rank() == 5


@pytest.mark.parametrize("env, rank", [
    ({}, 0),  # not distributed
    ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, 3),  # a torchrun child
    ({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}, 6),  # an srun task
    ({"RANK": "1", "PET_NODE_RANK": "1", "MASTER_ADDR": "m"}, 1),  # a PyTorchJob Worker's node parent
    ({"RANK": "2", "SLURM_PROCID": "0"}, 2),  # torchrun's RANK wins over the node's srun task id
    ({"RANK": "", "SLURM_PROCID": "x1", "PET_NODE_RANK": "4"}, 4),  # not numbers: not ranks
])
def test_global_rank_reads_the_launchers_variables_in_order(env, rank):
    assert global_rank(env) == rank
    assert is_rank0(env) is (rank == 0)


def test_rank_env_of_a_torchrun_child_is_its_own_variables():
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400",
           "PET_NNODES": "1"}
    assert rank_env(env) == {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


SRUN_TASK = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
             "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[03-04]", "SLURM_JOB_ID": "1234", "MASTER_ADDR": "gpu03"}


def test_an_srun_task_is_one_rank_with_the_jobs_master_and_port():
    assert rank_env(SRUN_TASK) == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "gpu03",
                                   "MASTER_PORT": str(DEFAULT_PORT + 1234)}
    no_master = {k: v for k, v in SRUN_TASK.items() if k != "MASTER_ADDR"}
    assert rank_env(no_master)["MASTER_ADDR"] == "gpu03"  # the first node of the allocation


def test_one_srun_task_is_no_rank_and_one_task_per_node_is_a_node_parent():
    assert rank_env({**SRUN_TASK, "SLURM_NTASKS": "1"}) is None  # merge / validate: one process
    per_node = {**SRUN_TASK, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_NODEID": "1",
                "LLAVA_NPROC_PER_NODE": "4"}
    assert rank_env(per_node) is None
    assert node_launch(8, per_node) == NodeLaunch(nnodes=2, nproc_per_node=4, node_rank=1, master_addr="gpu03",
                                                  master_port=DEFAULT_PORT + 1234)
    assert rank_env({}) is None


def test_nothing_set_is_this_machine_alone():
    launch = node_launch(2, {})
    assert launch == NodeLaunch(1, 2, 0, "127.0.0.1", 0) and launch.world_size == 2
    assert torchrun_argv(launch, ["stage", "train"])[3:5] == ["--nproc-per-node=2", "--standalone"]


def test_torchrun_runs_the_stage_argv_on_every_rank():
    from llava_cluster.stage import stage_argv

    launch = NodeLaunch(nnodes=2, nproc_per_node=4, node_rank=0, master_addr="gpu03", master_port=30000)
    assert launch.world_size == 8
    argv = torchrun_argv(launch, stage_argv("train", "/shared/runs/r"))
    assert argv == [sys.executable, "-m", "llava_cluster.launch.torchrun", "--nproc-per-node=4", "--nnodes=2",
                    "--node-rank=0", "--master-addr=gpu03", "--master-port=30000",
                    "-m", "llava_cluster.cli", "stage", "train", "--run-dir", "/shared/runs/r"]


@pytest.mark.parametrize("nodelist, first", [("gpu[03-05,9]", "gpu03"), ("n1,n2", "n1"), ("a-b[7]", "a-b7"),
                                             ("solo", "solo")])
def test_first_slurm_host_with_scontrol_and_without(nodelist, first, monkeypatch, tmp_path):
    if shutil.which("scontrol"):
        assert first_slurm_host(nodelist) == first
    monkeypatch.setenv("PATH", str(tmp_path))  # a container without SLURM's tools
    assert first_slurm_host(nodelist) == first


def test_slurm_port_is_one_per_job_and_the_default_without_one():
    assert slurm_port("1234") == slurm_port("1234") == DEFAULT_PORT + 1234
    assert slurm_port("21234") == DEFAULT_PORT + 1234 and slurm_port("1235") != slurm_port("1234")
    assert slurm_port(None) == slurm_port("") == slurm_port("12_3") == DEFAULT_PORT
    assert all(slurm_port(str(job)) < 65536 for job in (0, 19999, 10**9 + 7))


def test_a_one_node_trainjob_rendezvouses_on_loopback():
    """QLoRA under Trainer v2: one node whose PET_MASTER_ADDR is the pod's own DNS name."""
    launch = node_launch(4, {**TRAINER_V2, "PET_NNODES": "1", "PET_NODE_RANK": "0"})
    argv = torchrun_argv(launch, ["stage", "train"])
    assert "--standalone" in argv and not any(a.startswith("--master-addr") for a in argv)
