"""merge/streaming.py: the streaming merge must produce exactly what PEFT's merge_and_unload produces,
bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_fixture import assert_bitwise_equal, loaded_state, make_adapter, peft_merge
from safetensors import safe_open
from safetensors.torch import save_file

from llava_cluster.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from llava_cluster.errors import UserError
from llava_cluster.merge.safetensors_io import shard_files
from llava_cluster.merge.streaming import streaming_merge
from llava_cluster.model.family import FAMILIES


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    make_adapter(tiny_dir.model, out)
    return out


@pytest.mark.parametrize("dtype_name,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_streaming_merge_is_bitwise_peft_merge(tiny_dir, adapter_dir, tmp_path, dtype_name, dtype):
    base = tiny_dir.model
    streaming_merge(base, adapter_dir, tmp_path / "merged", dtype=dtype_name, progress=False)

    got = loaded_state(tmp_path / "merged", dtype)
    want = peft_merge(base, adapter_dir, dtype)
    assert_bitwise_equal(got, want)
    # ...and the merge did something: targeted weights and the projector moved, the rest did not.
    before = loaded_state(base, dtype)
    changed = {k for k in want if not torch.equal(before[k], got[k])}
    assert any(".language_model.layers.0.self_attn.q_proj.weight" in k for k in changed)
    assert any(".multi_modal_projector.linear_2.weight" in k for k in changed)
    assert not any("vision_tower" in k or "norm" in k or "embed_tokens" in k for k in changed)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert (tmp_path / "merged" / "processor_config.json").is_file()


def test_sharded_base_keeps_its_sharding(tiny_dir, adapter_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    sharded = tmp_path / "sharded"
    LlavaForConditionalGeneration.from_pretrained(tiny_dir.model).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (sharded / name).write_bytes((tiny_dir.model / name).read_bytes())
    shards = shard_files(sharded)
    assert len(shards) > 2

    streaming_merge(sharded, adapter_dir, tmp_path / "merged", progress=False)

    assert shard_files(tmp_path / "merged") == shards
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == checkpoint_bytes_of_data(tmp_path / "merged")
    assert_bitwise_equal(loaded_state(tmp_path / "merged", torch.float32),
                         peft_merge(sharded, adapter_dir, torch.float32))


def checkpoint_bytes_of_data(folder: Path) -> int:
    total = 0
    for shard in shard_files(folder):
        with safe_open(folder / shard, "pt") as fh:
            total += sum(fh.get_tensor(k).nbytes for k in fh.keys())
    return total


def test_rslora_scaling_matches_peft(tiny_dir, tmp_path):
    adapter = tmp_path / "adapter"
    make_adapter(tiny_dir.model, adapter, r=8, alpha=4.0, use_rslora=True)
    streaming_merge(tiny_dir.model, adapter, tmp_path / "merged", progress=False)
    assert_bitwise_equal(loaded_state(tmp_path / "merged", torch.float32),
                         peft_merge(tiny_dir.model, adapter, torch.float32))


def test_adapter_for_another_base_is_refused(tiny_dir, adapter_dir, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in adapter_dir.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, "pt") as fh:
        tensors = {k.replace("layers.1.", "layers.7."): fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors, wrong / ADAPTER_WEIGHTS)
    with pytest.raises(UserError, match="layers.7.*another base"):
        streaming_merge(tiny_dir.model, wrong, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_dora_is_refused_not_merged_wrongly(tiny_dir, adapter_dir, tmp_path):
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in adapter_dir.iterdir():
        (dora / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dora / ADAPTER_CONFIG).read_text())
    (dora / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        streaming_merge(tiny_dir.model, dora, tmp_path / "merged", progress=False)


def test_memory_names_cover_both_disk_layouts():
    """The key map the streaming merge writes by (model/family.py's table for LLaVA-1.5)."""
    memory_name = FAMILIES["llava"].memory_name
    assert memory_name("language_model.model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert memory_name("language_model.lm_head.weight") == "lm_head.weight"
    assert memory_name("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert memory_name("multi_modal_projector.linear_1.bias") == "model.multi_modal_projector.linear_1.bias"
    assert memory_name("model.language_model.norm.weight") == "model.language_model.norm.weight"

