"""Resuming reads pickled states (DeepSpeed's model/optimizer partitions, the Trainer's RNG and
scheduler states) from shared storage, so anyone who can write the run directory could otherwise run
code in the next job. Every such pickle is unpickled by torch's weights-only unpickler, which builds
tensors, plain containers and the few DeepSpeed/numpy types listed here, and calls nothing else."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from llava_cluster.errors import UserError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")


def allowed_globals() -> list:
    """The non-tensor types found in DeepSpeed ZeRO-1/2/3 and Trainer checkpoints: plain data, no code."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    np_core = np._core if hasattr(np, "_core") else np.core
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address,
            np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def force_weights_only() -> None:
    """From now on every torch.load in this process (and its data-loader workers) is weights-only with
    the allow-list, whatever its caller asks: DeepSpeed's checkpoint engine passes weights_only=False."""
    import torch

    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.serialization.add_safe_globals(allowed_globals())


def check_checkpoint(folder: Path) -> None:
    """Unpickle every pickle in `folder` weights-only before anything is resumed from it, and refuse
    the checkpoint naming the first file that is not plain data (or cannot be read).

    Tensors are memory-mapped, so this reads the object graphs, not the weights.
    """
    import torch

    # added for good, not in a `safe_globals` context: its exit would drop them for force_weights_only too
    torch.serialization.add_safe_globals(allowed_globals())
    for path in sorted(p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file()):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as err:  # unsafe global, truncated zip, not a torch file: all refused alike
            raise UserError(
                f"unsafe or corrupt checkpoint file {path} ({_reason(err)}): nothing was loaded from it. "
                f"If you did not put it there, someone else can write this run directory; otherwise delete "
                f"{folder} to resume from the checkpoint before it."
            ) from None


def _reason(err: Exception) -> str:
    """torch's refusal names the blocked global amid advice to load with weights_only=False: keep only that."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line]
    return (named or lines or [type(err).__name__])[0][:300]
