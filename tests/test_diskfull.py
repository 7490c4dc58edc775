"""Disk-full recognition (Python's ENOSPC/EDQUOT, torch's errno-less writer errors on a nearly full disk) and its
one message. A real full filesystem under a training run is in test_stage.py; the marker write is in test_train.py."""

from __future__ import annotations

import errno
import subprocess

import pytest

from llava_cluster.diskfull import disk_full_message, is_disk_full


def test_enospc_and_edquot_anywhere_in_the_chain(tmp_path):
    for code in (errno.ENOSPC, errno.EDQUOT):
        try:
            try:
                raise OSError(code, "full", "x")
            except OSError as inner:
                raise RuntimeError("save failed") from inner
        except RuntimeError as outer:
            assert is_disk_full(outer, tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "denied"), tmp_path)
    assert not is_disk_full(ValueError("no"), tmp_path)


def test_torchs_errnoless_write_error_counts_only_on_a_nearly_full_disk(tmp_path):
    torch_error = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 448 vs 342 "
                               "basic_ios::clear: iostream error")
    assert not is_disk_full(torch_error, tmp_path)  # plenty of space here: some other write failure
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert is_disk_full(torch_error, mount / "runs" / "r")  # not created yet: its filesystem counts
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_the_message_names_storage_space_and_checkpoint_size(tmp_path):
    ckpt = tmp_path / "train" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "optim.pt").write_bytes(b"\0" * 3 * 2**20)
    message = disk_full_message(tmp_path, ckpt)
    assert message.startswith(f"no space left on the storage of {tmp_path} (filesystem ")
    assert "free of" in message and "one checkpoint of this run takes 3.0 MiB (checkpoint-4)" in message
    assert message.endswith("resubmit: the stage resumes from checkpoint-4.")
    assert disk_full_message(tmp_path / "nope").endswith("the stage starts again.")
