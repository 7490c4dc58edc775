"""What every checkpoint and the final save hold, and how to read it back.

    adapter_config.json, adapter_model.safetensors   the LoRA adapter, PEFT layout
    non_lora_trainables.safetensors                  the projector (+ image_newline for LLaVA-NeXT: every
                                                     trained non-LoRA tensor), keys as in the family's model class
    llava_cluster.json                               base path, template, method, spec digest, LoRA shape

Under ZeRO-3 every rank holds a slice of each parameter: the trainable ones (LoRA + projector, a few
hundred MB at most) are gathered on all ranks — a collective — and global rank 0 writes. A plain
`save_pretrained()` there would write empty tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from llava_cluster.errors import UserError
from llava_cluster.rundir import atomic_write_json, honour_umask, is_rank0

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROJECTOR_FILE = "non_lora_trainables.safetensors"
METADATA_FILE = "llava_cluster.json"
PEFT_PREFIX = "base_model.model."


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
    from safetensors.torch import save_file

    lora, projector = split_state(state)
    empty = [n for n, t in state.items() if t.numel() == 0]
    if empty:
        raise RuntimeError(f"refusing to save empty tensors (ZeRO-3 gather failed?): {empty[:3]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".tmp-artifacts-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), state_dict=lora, safe_serialization=True)
    save_file(projector, str(tmp / PROJECTOR_FILE), metadata={"format": "pt"})
    atomic_write_json(tmp / METADATA_FILE, metadata)
    honour_umask(tmp)  # PEFT and safetensors write 0600: unreadable to teammates on shared storage
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTOR_FILE, METADATA_FILE):
        os.replace(tmp / name, out_dir / name)
    shutil.rmtree(tmp, ignore_errors=True)


def check_artifacts(adapter_dir: str | Path) -> Path:
    """Fail with one clear message when an adapter folder is not a complete llava-cluster save."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder not found: {adapter_dir}")
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTOR_FILE) if not (adapter_dir / f).is_file()]
    if missing:
        hint = ""
        if (adapter_dir / "non_lora_trainables.bin").exists():
            hint = " (original LLaVA output: convert it with `llava-cluster convert adapter`)"
        raise UserError(f"{adapter_dir} is not a complete adapter: missing {', '.join(missing)}{hint}")
    return adapter_dir


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / METADATA_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def load_projector(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / PROJECTOR_FILE))


def apply_projector(model: torch.nn.Module, adapter_dir: str | Path) -> list[str]:
    """Copy the trained projector (and the family's other non-LoRA trainables) into a base model (not
    yet PEFT-wrapped).
    Fails loudly when a key does not exist or the shape differs: a projector left at its base
    values is the silent failure this product exists to prevent."""
    weights = load_projector(adapter_dir)
    params = dict(model.named_parameters())
    problems = [k for k in weights if k not in params]
    problems += [f"{k} {tuple(weights[k].shape)} vs {tuple(params[k].shape)}"
                 for k in weights if k in params and weights[k].shape != params[k].shape]
    if problems:
        raise UserError(f"projector in {adapter_dir} does not fit this base model: {problems[:3]}")
    with torch.no_grad():
        for key, value in weights.items():
            params[key].copy_(value.to(params[key].dtype))
    return sorted(weights)
