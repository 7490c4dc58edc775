"""merge/verify.py: the checks a merge must pass — the probe batch the in-memory merge compares logits
on, and the tensor-by-tensor check of a streamed output."""

from __future__ import annotations

import json
import shutil

from adapter_fixture import make_adapter

from llava_cluster.adapter import ADAPTER_CONFIG, LazyAdapter
from llava_cluster.merge.streaming import streaming_merge
from llava_cluster.merge.verify import probe_inputs, verify_streamed


def test_tensor_check_catches_a_wrong_merge(tiny_dir, tmp_path):
    """An output merged with another adapter (twice the scaling) fails on its first LoRA weight."""
    adapter, other = tmp_path / "adapter", tmp_path / "other-adapter"
    make_adapter(tiny_dir.model, other, alpha=16.0)
    shutil.copytree(other, adapter)  # the same A and B with half the alpha: half the scaling
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "lora_alpha": 8.0}))
    streaming_merge(tiny_dir.model, other, tmp_path / "wrong", dtype="fp32", progress=False)
    check = verify_streamed(tiny_dir.model, adapter, tmp_path / "wrong", tolerance=1e-5)
    assert check.mismatch and "probe output differs" in check.mismatch
    assert "language_model" in check.mismatch and ("proj" in check.mismatch)
    good = verify_streamed(tiny_dir.model, other, tmp_path / "wrong", tolerance=1e-5)
    assert good.mismatch is None
    assert good.lora_weights == len(LazyAdapter(other).pairs) > 0 and good.checked > good.lora_weights


def test_probe_batch_is_one_image_prompt_and_one_text_prompt_left_padded(tiny_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir.model)
    side = processor.tokenizer.padding_side
    batch = probe_inputs(processor)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    per_row = (batch["input_ids"] == image_token).sum(dim=1).tolist()
    assert per_row[0] > 0 and per_row[1] == 0
    assert batch["pixel_values"].shape[0] == 1
    assert batch["attention_mask"][:, -1].tolist() == [1, 1], "left padding: every row ends with a real token"
    assert processor.tokenizer.padding_side == side, "the processor's padding side is left as it was"
    assert probe_inputs(processor)["input_ids"].tolist() == batch["input_ids"].tolist(), "fixed, not random"
