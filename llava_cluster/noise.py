"""Library chatter kept out of the user's terminal. Each line here looked like an error to a new user
and says nothing they can act on: bitsandbytes' CPU-kernel hint (kept for QLoRA, which uses it),
transformers' torchvision fallback, DeepSpeed's accelerator guess and its comm-op build, torchrun's
OMP_NUM_THREADS banner and accelerate's thread-count note, the gcc probes of DeepSpeed's op builder. `llava-cluster -v` (or
LLAVA_CLUSTER_VERBOSE=1, which every child process inherits) brings them all back."""

from __future__ import annotations

import logging
import os
import warnings

from llava_cluster.rundir import PREEMPTED_EXIT

VERBOSE_ENV = "LLAVA_CLUSTER_VERBOSE"
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
# logger -> fragments of the messages dropped from it
NOISE: dict[str, tuple[str, ...]] = {
    BNB_LOGGER: ("gemm_4bit_forward",),
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "DeepSpeed": ("Setting accelerator to",),
    "torch.distributed.run": ("OMP_NUM_THREADS",),
    # torchrun's agent on ranks that stopped after their checkpoint (exit 75), and on the ranks it ends
    # after a failure (launch/torchrun.py says the failure in one line)
    "torch.distributed.elastic.multiprocessing.api": (f"failed (exitcode: {PREEMPTED_EXIT})", "closing signal SIGTERM"),
}
WARNINGS = ("OMP_NUM_THREADS/MKL_NUM_THREADS unset",)  # accelerate, when it picks a thread count itself
PROBES = "compilers"  # the parent logger of DeepSpeed's op builder probing gcc at every start (INFO)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _Drop(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(fragment in text for fragment in self.fragments)


def quiet(qlora: bool = False) -> None:
    """Install the filters (idempotent); none when verbose. QLoRA keeps bitsandbytes' messages."""
    for name, fragments in NOISE.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _Drop)]:
            logger.removeFilter(old)
        if not verbose() and not (qlora and name == BNB_LOGGER):
            logger.addFilter(_Drop(fragments))
    logging.getLogger(PROBES).setLevel(logging.NOTSET if verbose() else logging.WARNING)
    for message in WARNINGS:
        warnings.filterwarnings("default" if verbose() else "ignore", message=message)
