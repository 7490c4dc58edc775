"""merge/run.py, the merge command: the output keeps the base's stored dtype unless told otherwise, and `--verify` always runs a
check — logits in memory, tensor by tensor when streaming — and the merge record says which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_fixture import make_adapter
from safetensors import safe_open

from llava_cluster.adapter import METADATA_FILE
from llava_cluster.cli import main
from llava_cluster.errors import UserError
from llava_cluster.merge import verify
from llava_cluster.merge.run import MERGE_INFO, merge_adapter, read_merge_info


def stored_dtypes(folder: Path) -> set[str]:
    found = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as fh:
            found |= {fh.get_slice(k).get_dtype() for k in fh.keys()}
    return found


@pytest.fixture(scope="module")
def fp16_base(tiny_dir, tmp_path_factory) -> Path:
    """The tiny base saved as llava-hf ships its checkpoints: fp16."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path_factory.mktemp("fp16-base")
    LlavaForConditionalGeneration.from_pretrained(tiny_dir.model, dtype=torch.float16).save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_dir.model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter")
    make_adapter(tiny_dir.model, out)
    return out


@pytest.mark.parametrize("streaming", [False, True])
def test_output_dtype_defaults_to_the_base_stored_dtype(fp16_base, adapter, tmp_path, streaming):
    result = merge_adapter(adapter, tmp_path / "merged", base=fp16_base, verify=True, streaming=streaming)
    assert result.dtype == "fp16"
    assert stored_dtypes(tmp_path / "merged") == {"F16"}


def test_fp32_base_merges_in_fp32_and_matches_base_plus_adapter(tiny_dir, adapter, tmp_path):
    """Before, a fp32 base was merged into bf16 unless --dtype was given (4e-2 off in the logits)."""
    result = merge_adapter(adapter, tmp_path / "merged", base=tiny_dir.model, verify=True, streaming=False)
    assert (result.dtype, result.verification) == ("fp32", "logits")
    assert result.rel_diff < 1e-5
    assert read_merge_info(tmp_path / "merged")["verification"] == "logits"


def test_streaming_verify_checks_every_tensor_and_records_it(tiny_dir, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    code = main(["merge", "--adapter", str(adapter), "--base", str(tiny_dir.model), "--out", str(out),
                 "--streaming", "--verify", "--json"])
    assert code == 0
    record = json.loads((out / MERGE_INFO).read_text())
    assert record["streaming"] is True and record["verification"] == "tensors"
    assert 0 < record["rel_diff"] < 1e-5, "fp32 merge: the probe outputs agree to rounding"
    assert main(["merge", "--adapter", str(adapter), "--base", str(tiny_dir.model), "--out", str(tmp_path / "plain"),
                 "--streaming"]) == 0
    assert read_merge_info(tmp_path / "plain")["verification"] == "none"
    assert "not verified" in capsys.readouterr().err


def test_failed_streaming_verification_keeps_the_previous_output(tiny_dir, adapter, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier merge")
    monkeypatch.setitem(verify.TOLERANCE, "fp32", 0.0)  # nothing passes a zero tolerance
    with pytest.raises(UserError, match="verification failed.*nothing was written"):
        merge_adapter(adapter, out, base=tiny_dir.model, verify=True, streaming=True)
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]
    assert not list(tmp_path.glob(".tmp-*")), "the temp folder is cleaned up"


def test_failed_in_memory_verification_writes_nothing(tiny_dir, adapter, tmp_path, monkeypatch):
    monkeypatch.setitem(verify.TOLERANCE, "fp32", 0.0)
    out = tmp_path / "merged"
    with pytest.raises(UserError, match="merge verification failed") as err:
        merge_adapter(adapter, out, base=tiny_dir.model, dtype="fp32", verify=True, streaming=False)
    assert err.value.exit_code == 1
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_merge_refuses_an_existing_out_unless_overwrite(tiny_dir, adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("somebody's files")
    args = ["merge", "--adapter", str(adapter), "--base", str(tiny_dir.model), "--out", str(out), "--streaming"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").is_file()
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_a_moved_base_is_named_as_the_recorded_one(tiny_dir, adapter, tmp_path, capsys):
    from llava_cluster.rundir import atomic_write_json

    atomic_write_json(adapter / METADATA_FILE, {"base": str(tmp_path / "moved-away"), "template": "vicuna_v1"})
    try:
        assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert "the base recorded in" in err and "moved-away" in err and "pass --base" in err
    finally:
        (adapter / METADATA_FILE).unlink()
