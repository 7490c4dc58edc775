"""Saving what training produced as an adapter folder (`llava_cluster/adapter.py` says what it holds).

Under ZeRO-3 every rank holds a slice of each parameter: the trainable ones (LoRA + projector, a few
hundred MB at most) are gathered on all ranks — a collective — and global rank 0 writes. A plain
`save_pretrained()` there would write empty tensors.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from llava_cluster.adapter import ADAPTER_FILES, PEFT_PREFIX, write_metadata, write_non_lora
from llava_cluster.rundir import honour_umask, is_rank0


def _gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def gather_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of all trainable tensors on CPU. Every rank must call this (collective under ZeRO-3)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with _gathered([p for _, p in named]):
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA tensors under PEFT names, projector tensors under base-model names)."""
    lora = {n: t for n, t in state.items() if "lora_" in n}
    projector = {n.removeprefix(PEFT_PREFIX): t for n, t in state.items() if "lora_" not in n}
    return lora, projector


def write_artifacts(peft_model: Any, state: dict[str, torch.Tensor], out_dir: Path, metadata: dict[str, Any]) -> None:
    """Rank 0 only. Files land through a temp folder, so a reader never sees a half-written one."""
    if not is_rank0():
        return
    lora, projector = split_state(state)
    empty = [n for n, t in state.items() if t.numel() == 0]
    if empty:
        raise RuntimeError(f"refusing to save empty tensors (ZeRO-3 gather failed?): {empty[:3]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-artifacts-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), state_dict=lora, safe_serialization=True)
    write_non_lora(tmp, projector)
    write_metadata(tmp, metadata)
    honour_umask(tmp)  # PEFT and safetensors write 0600: unreadable to teammates on shared storage
    for name in ADAPTER_FILES:
        os.replace(tmp / name, out_dir / name)
    shutil.rmtree(tmp, ignore_errors=True)

