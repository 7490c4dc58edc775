"""Where am I in the job? One place maps every launcher's environment onto torch.distributed's.

Three shapes, checked in this order:
  rank     one process per rank already: torchrun children (RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*), or
           SLURM srun tasks (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS; master = first allocated node)
  node     one process per node that must start its ranks: a Kubeflow Trainer v2 TrainJob
           (PET_NNODES, PET_NPROC_PER_NODE — a number or `auto` —, PET_NODE_RANK, PET_MASTER_ADDR,
           PET_MASTER_PORT, nothing else), a Kubeflow PyTorchJob (MASTER_ADDR, MASTER_PORT and the
           same PET_NNODES/PET_NPROC_PER_NODE/PET_NODE_RANK; RANK there is the node rank), or an
           sbatch with one task per node — re-executed under torchrun, static rendezvous
  local    nothing set: this machine alone, `resources.gpus_per_node` ranks (torchrun if more than 1)

SLURM jobs use the rank shape: `srun --ntasks-per-node=<gpus>` starts every rank directly, so a
`--signal` reaches each rank without a torchrun agent in between, and no hostfile or ssh is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from llava_cluster.errors import UserError

DEFAULT_PORT = 29500
PYTORCHJOB_PORT = 23456  # the training operator's default master port
# where a process finds its rank, first found wins: torchrun's (or a PyTorchJob pod's node rank), srun's,
# a Kubeflow Trainer v2 pod's node rank
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "PET_NODE_RANK")


@dataclass(frozen=True)
class NodeLaunch:
    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist like `gpu[03-05,9]` (scontrol knows every syntax)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def slurm_port(job_id: str | None) -> int:
    """A port every node of one job derives alike, different between jobs sharing a node."""
    return DEFAULT_PORT + (int(job_id) % 20000 if job_id and job_id.isdigit() else 0)


def global_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank (torchrun's RANK, an srun task's SLURM_PROCID), 0 when not distributed.
    A node parent has its node rank instead (RANK in a PyTorchJob, PET_NODE_RANK in a TrainJob,
    SLURM_PROCID with one task per node): node 0 hosts global rank 0, so rank 0 is who writes."""
    env = os.environ if env is None else env
    for var in RANK_VARIABLES:
        if env.get(var, "").isdigit():
            return int(env[var])
    return 0


def is_rank0(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process writes the run directory's shared files (see global_rank)."""
    return global_rank(env) == 0


def rank_env(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """The torch.distributed variables for a process that already is one rank, else None."""
    env = dict(os.environ if env is None else env)
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if all(k in env for k in keys):
        return {k: env[k] for k in keys}
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        if int(env["SLURM_NTASKS"]) == int(env.get("SLURM_NNODES", "1")) and env.get("LLAVA_NPROC_PER_NODE"):
            return None  # one task per node that must start its own ranks: node shape
        return {
            "RANK": env["SLURM_PROCID"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"]),
            "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_port(env.get("SLURM_JOB_ID"))),
        }
    return None


def node_launch(gpus_per_node: int, env: dict[str, str] | None = None) -> NodeLaunch:
    """The node-level picture when this process must start the node's ranks itself."""
    env = dict(os.environ if env is None else env)
    if "PET_NNODES" in env:  # Kubeflow: Trainer v2 sets PET_MASTER_*, the training operator v1 MASTER_*
        master_addr = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR")
        if not master_addr:
            raise UserError("PET_NNODES is set but neither PET_MASTER_ADDR (Kubeflow Trainer v2) nor "
                            "MASTER_ADDR (PyTorchJob) is: the launcher did not say where rank 0 listens")
        nproc = env.get("PET_NPROC_PER_NODE", "auto")
        return NodeLaunch(
            nnodes=int(env["PET_NNODES"].split(":")[-1]),
            # `auto` (Trainer v2's default): the node's GPUs, which the spec's resources request
            nproc_per_node=gpus_per_node if nproc == "auto" else int(nproc),
            node_rank=int(env.get("PET_NODE_RANK", env.get("RANK", "0"))),
            master_addr=master_addr,
            master_port=int(env.get("PET_MASTER_PORT") or env.get("MASTER_PORT") or PYTORCHJOB_PORT),
        )
    if "SLURM_JOB_NODELIST" in env and "SLURM_NNODES" in env:
        return NodeLaunch(
            nnodes=int(env["SLURM_NNODES"]),
            nproc_per_node=int(env.get("LLAVA_NPROC_PER_NODE", gpus_per_node)),
            node_rank=int(env.get("SLURM_NODEID", "0")),
            master_addr=env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"]),
            master_port=int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID"))),
        )
    return NodeLaunch(1, gpus_per_node, 0, "127.0.0.1", 0)


def torchrun_argv(launch: NodeLaunch, stage_argv: list[str]) -> list[str]:
    """torchrun with a static rendezvous on the master; every rank then runs `stage_argv`."""
    argv = [sys.executable, "-m", "llava_cluster.launch.torchrun", f"--nproc-per-node={launch.nproc_per_node}"]
    if launch.nnodes == 1:
        # one node: a rendezvous on loopback and a free port, whatever master the launcher named (a
        # one-node TrainJob's PET_MASTER_ADDR is the pod's own DNS name, not resolvable at once)
        argv.append("--standalone")
    else:
        argv += [f"--nnodes={launch.nnodes}", f"--node-rank={launch.node_rank}",
                 f"--master-addr={launch.master_addr}", f"--master-port={launch.master_port}"]
    return argv + ["-m", "llava_cluster.cli", *stage_argv]
