"""Checkpoint pickles are loaded weights-only: DeepSpeed's and the Trainer's real state types load, a planted
payload or a truncated file is refused naming the file, and nothing in it runs. (The refusal of a real resume is
in test_train.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from llava_cluster.errors import UserError  # noqa: E402
from llava_cluster.train.checkpoint_safety import check_checkpoint, force_weights_only  # noqa: E402

PAYLOAD = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {sys.argv[2]}",))
torch.save({"optimizer_state_dict": Payload()}, sys.argv[1])
"""


def plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", PAYLOAD, str(path), str(marker)], check=True)
    return path


def real_states(folder):
    """The objects DeepSpeed (ZeRO-2/3, fp16 loss scaling) and the Trainer (RNG) put in their pickles."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    (folder / "global_step2").mkdir(parents=True)
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights, "ds_version": "0.19",
                "dynamic": DynamicLossScaler(2**16, 1000, 1.0, 2, True), "param_slice_mappings": [
                    {"a": fragment_address(numel=4, start=0)}], "fp32": [torch.ones(4)]},
               folder / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"python": None, "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
               folder / "rng_state.pth")


def test_real_deepspeed_and_trainer_states_pass(tmp_path):
    real_states(tmp_path)
    check_checkpoint(tmp_path)


def test_a_planted_payload_is_refused_by_name_and_never_runs(tmp_path):
    real_states(tmp_path)
    marker = tmp_path / "PWNED"
    bad = plant(tmp_path / "global_step2" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UserError, match="unsafe or corrupt checkpoint") as err:
        check_checkpoint(tmp_path)
    assert str(bad) in err.value.message and "posix.system" in err.value.message
    assert not marker.exists()


def test_a_truncated_state_is_refused_by_name(tmp_path):
    real_states(tmp_path)
    rng = tmp_path / "rng_state.pth"
    rng.write_bytes(rng.read_bytes()[:200])
    with pytest.raises(UserError, match="unsafe or corrupt checkpoint") as err:
        check_checkpoint(tmp_path)
    assert str(rng) in err.value.message


def test_after_force_weights_only_even_weights_only_false_cannot_run_a_payload(tmp_path, monkeypatch):
    """DeepSpeed's checkpoint engine asks torch.load for weights_only=False; the backstop overrides it."""
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    marker = tmp_path / "PWNED"
    bad = plant(tmp_path / "payload.pt", marker)
    force_weights_only()
    with pytest.raises(Exception, match="GLOBAL posix.system"):
        torch.load(bad, weights_only=False)
    assert not marker.exists()
    real_states(tmp_path / "ok")
    assert torch.load(tmp_path / "ok" / "rng_state.pth", weights_only=False)["python"] is None


def test_checking_a_checkpoint_keeps_the_allow_list_for_the_loads_that_follow(tmp_path, monkeypatch):
    """check_checkpoint runs after force_weights_only; DeepSpeed's own load must still accept its types."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    force_weights_only()
    real_states(tmp_path)
    check_checkpoint(tmp_path)
    state = torch.load(tmp_path / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert state["zero_stage"] is ZeroStageEnum.weights
