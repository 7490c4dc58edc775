"""merge/safetensors_io.py: checkpoints read and written one tensor at a time."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llava_cluster.errors import UserError
from llava_cluster.merge.safetensors_io import (
    INDEX_NAME,
    read_tensor,
    shard_files,
    stored_dtype,
    write_safetensors,
)


def write_checkpoint(folder, shards: dict[str, dict[str, torch.Tensor]]) -> None:
    """A sharded checkpoint with its index, written by the streaming writer."""
    folder.mkdir()
    weight_map = {}
    for name, tensors in shards.items():
        write_safetensors(folder / name, [(k, t.dtype, list(t.shape)) for k, t in tensors.items()], tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_streamed_file_reads_back_as_written_with_safetensors_own_reader(tmp_path):
    tensors = {"w": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "mask": torch.tensor([True, False, True]), "h": torch.randn(2, 2, 2).half()}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, [(k, t.dtype, list(t.shape)) for k, t in tensors.items()], iter(tensors.values()))
    got = load_file(path)
    assert got.keys() == tensors.keys()
    assert all(got[k].dtype == t.dtype and torch.equal(got[k], t) for k, t in tensors.items())
    with safe_open(path, "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    assert torch.equal(read_tensor(path, "w"), tensors["w"])


def test_a_tensor_that_does_not_match_the_plan_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match=r"w: planned torch.float32\[2, 2\], got torch.float16\[2, 2\]"):
        write_safetensors(tmp_path / "x.safetensors", [("w", torch.float32, [2, 2])], [torch.zeros(2, 2).half()])


def test_stored_dtype_reads_the_weights(tiny_dir, tmp_path):
    """The dtype most floating tensors have, across shards; integer buffers do not count."""
    assert stored_dtype(tiny_dir.model) == "fp32"
    write_checkpoint(tmp_path / "fp16", {
        "model-00001-of-00002.safetensors": {"a": torch.zeros(2).half(), "ids": torch.arange(4)},
        "model-00002-of-00002.safetensors": {"b": torch.zeros(2).half(), "norm": torch.zeros(2)},
    })
    assert stored_dtype(tmp_path / "fp16") == "fp16"
    assert shard_files(tmp_path / "fp16") == {"model-00001-of-00002.safetensors": ["a", "ids"],
                                              "model-00002-of-00002.safetensors": ["b", "norm"]}


def test_a_folder_without_safetensors_weights_is_named(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="no model.safetensors or model.safetensors.index.json.*convert original"):
        shard_files(tmp_path)
    write_checkpoint(tmp_path / "ints", {"model.safetensors": {"ids": torch.arange(3)}})
    with pytest.raises(UserError, match="no floating-point weights found; pass --dtype"):
        stored_dtype(tmp_path / "ints")
