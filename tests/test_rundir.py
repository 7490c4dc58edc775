"""What we write on shared storage honours the umask: 0644/0755 under 022, 0664/0775 under 002, never the
0600/0700 of private temp files, safetensors outputs (adapter, projector, merged shards) included."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava_cluster.rundir import atomic_dir, atomic_write_bytes, atomic_write_json, current_umask


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of `root` and everything below it ("." is root)."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        found[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return found


def assert_shared(root: Path, mask: int) -> None:
    want = {name: (0o777 if (root / name).is_dir() else 0o666) & ~mask for name in modes(root)}
    assert modes(root) == want


def test_current_umask_reads_without_changing(umask):
    assert current_umask() == umask
    assert os.umask(umask) == umask


def test_atomic_file_honours_the_umask(tmp_path, umask):
    atomic_write_bytes(tmp_path / "new" / "a.bin", b"x")
    atomic_write_json(tmp_path / "new" / "b.json", {"a": 1})
    atomic_write_bytes(tmp_path / "new" / "a.bin", b"replaced")
    assert (tmp_path / "new" / "a.bin").read_bytes() == b"replaced"
    assert_shared(tmp_path / "new", umask)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["a.bin", "b.json"]  # no temp left


def test_atomic_dir_honours_the_umask_whatever_wrote_into_it(tmp_path, umask):
    with atomic_dir(tmp_path / "out") as tmp:
        save_file({"w": torch.zeros(3)}, tmp / "model.safetensors")  # safetensors alone: 0600
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(tmp / "sub" / "run.sh", 0o700)
    assert stat.S_IMODE((tmp_path / "out" / "sub" / "run.sh").stat().st_mode) == 0o777 & ~umask  # exec kept
    os.chmod(tmp_path / "out" / "sub" / "run.sh", 0o666 & ~umask)
    assert_shared(tmp_path / "out", umask)
    with atomic_dir(tmp_path / "out") as tmp:  # replacing an existing folder: the same modes
        (tmp / "x").write_text("x")
    assert_shared(tmp_path / "out", umask)


def test_atomic_dir_keeps_the_setgid_bit_of_a_group_shared_folder(tmp_path, umask):
    shared = tmp_path / "project"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    with atomic_dir(shared / "out") as tmp:
        (tmp / "sub").mkdir()
    for folder in (shared / "out", shared / "out" / "sub"):
        assert stat.S_IMODE(folder.stat().st_mode) == stat.S_ISGID | (0o777 & ~umask)


@pytest.fixture(scope="module")
def peft_model(tiny_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from llava_cluster.spec import DEFAULT_LORA_TARGETS

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir.model, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=DEFAULT_LORA_TARGETS))
    for name, param in peft.named_parameters():
        if ".multi_modal_projector." in name:
            param.requires_grad_(True)
    return peft


def test_adapter_projector_and_merged_model_are_readable_by_the_team(tiny_dir, peft_model, tmp_path, umask):
    from llava_cluster.adapter import ADAPTER_WEIGHTS, PROJECTOR_FILE
    from llava_cluster.merge.streaming import streaming_merge
    from llava_cluster.train.artifacts import gather_trainable_state, write_artifacts

    adapter = tmp_path / "final"
    write_artifacts(peft_model, gather_trainable_state(peft_model), adapter, {"step": 1})
    assert {ADAPTER_WEIGHTS, PROJECTOR_FILE} <= {p.name for p in adapter.iterdir()}
    assert_shared(adapter, umask)
    streaming_merge(tiny_dir.model, adapter, tmp_path / "merged", progress=False)
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "merged").iterdir())
    assert_shared(tmp_path / "merged", umask)


def test_the_status_sets_split_what_a_state_file_can_say(tmp_path):
    """logs --follow stops at FINISHED, the k8s waiter gives up on UNSUCCESSFUL, status asks SLURM about
    AWAITING_JOB; every state the run directory writes falls in exactly the sets it should."""
    from llava_cluster.rundir import AWAITING_JOB, FINISHED, STATUSES, UNSUCCESSFUL, RunDir

    assert FINISHED | AWAITING_JOB | {"preempted"} == set(STATUSES) and not FINISHED & AWAITING_JOB
    assert FINISHED - UNSUCCESSFUL == {"succeeded"} and UNSUCCESSFUL < FINISHED
    run = RunDir(tmp_path / "run")
    assert run.read_state("train").status in AWAITING_JOB  # pending
    assert run.mark_running("train").status in AWAITING_JOB
    assert run.mark_done("train").status in FINISHED - UNSUCCESSFUL
    assert run.mark_done("merge", error="boom").status in UNSUCCESSFUL
