"""The precision names a spec and the CLI use (bf16, fp16, fp32) and the torch dtypes they mean."""

from __future__ import annotations

from typing import Any

TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SAFETENSORS_CODES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


def torch_dtype(name: str) -> Any:
    """torch.bfloat16 for "bf16", and so on."""
    import torch

    return getattr(torch, TORCH_NAMES[name])
