"""Safetensors checkpoints read and written one tensor at a time: the shards of a checkpoint and their
keys, one tensor in, a file streamed out, and the dtype most weights are stored in."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llava_cluster.errors import UserError
from llava_cluster.precision import SAFETENSORS_CODES

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Header dtype codes -> torch dtype names.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                      "BOOL": "bool"}


def shard_files(base: Path) -> dict[str, list[str]]:
    """Shard file name -> its tensor keys, from the index (or the single `model.safetensors`)."""
    index = base / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        return shards
    if (base / SINGLE_NAME).is_file():
        from safetensors import safe_open

        with safe_open(base / SINGLE_NAME, "pt") as fh:
            return {SINGLE_NAME: list(fh.keys())}
    raise UserError(
        f"{base}: no {SINGLE_NAME} or {INDEX_NAME}; the streaming merge reads safetensors checkpoints only "
        "(convert a pickle checkpoint once with `llava-cluster convert original`)"
    )


def stored_dtype(base: str | Path) -> str:
    """bf16|fp16|fp32: the dtype most of the base's floating weights are stored in (safetensors headers)."""
    from collections import Counter

    from safetensors import safe_open

    count: Counter[str] = Counter()
    for shard, keys in shard_files(Path(base)).items():
        with safe_open(Path(base) / shard, "pt") as fh:
            for key in keys:
                piece = fh.get_slice(key)
                if piece.get_dtype() in SAFETENSORS_CODES:
                    count[SAFETENSORS_CODES[piece.get_dtype()]] += 1
    if not count:
        raise UserError(f"{base}: no floating-point weights found; pass --dtype bf16|fp16|fp32")
    return count.most_common(1)[0][0]


def read_tensor(path: Path, key: str) -> Any:
    """One tensor, with the file opened just for it. safe_open memory-maps the file, and the pages a
    read touched stay in this process's RSS until the file is closed: kept open, a 5 GB shard would
    end up resident in full."""
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        return fh.get_tensor(key)


def nbytes(dtype: Any, shape: list[int]) -> int:
    n = dtype.itemsize
    for dim in shape:
        n *= dim
    return n


def write_safetensors(path: Path, plan: list[tuple[str, Any, list[int]]], tensors: Iterable[Any]) -> None:
    """Write a safetensors file from a header plan [(key, torch dtype, shape)] and the tensors in the
    same order, one at a time. safetensors' own writer needs every tensor in memory at once."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in plan:
        n = nbytes(dtype, shape)
        code = next(c for c, name in SAFETENSORS_DTYPES.items() if getattr(torch, name) == dtype)
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for (key, dtype, shape), tensor in zip(plan, tensors, strict=True):
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise RuntimeError(f"{key}: planned {dtype}{shape}, got {tensor.dtype}{list(tensor.shape)}")
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            fh.write(memoryview(data))
        fh.flush()
        os.fsync(fh.fileno())
