"""The precision names a spec and the CLI use (bf16, fp16, fp32): the one table of the torch dtypes they
mean and their sizes. torch is imported only when a dtype is asked for: `plan`, spec validation and
`--help` run without it."""

from __future__ import annotations

from typing import Any, Literal, get_args

Precision = Literal["bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
SAFETENSORS_CODES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


def torch_dtype(name: str) -> Any:
    """torch.bfloat16 for "bf16", and so on."""
    import torch

    return getattr(torch, TORCH_NAMES[name])
