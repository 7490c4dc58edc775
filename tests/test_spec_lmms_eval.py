"""The validation.lmms_eval block as a spec section (spec/lmms_eval.py): what lmms-eval cannot run is
refused at load, and the block shares every section's rules (unknown keys, validated assignments)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llava_cluster.spec import LmmsEvalSpec


def test_block_refuses_batches_llava_hf_cannot_run_and_empty_task_lists():
    with pytest.raises(ValidationError, match="batch_size must be 1"):
        LmmsEvalSpec(tasks=["mme"], batch_size=4)
    with pytest.raises(ValidationError, match="at least 1 item"):
        LmmsEvalSpec(tasks=[])
    assert LmmsEvalSpec(tasks=["mme"], model="other_backend", batch_size=4).batch_size == 4


def test_block_refuses_unknown_keys_and_bad_assignments_like_every_section():
    with pytest.raises(ValidationError, match="task\n  Extra inputs are not permitted"):
        LmmsEvalSpec(tasks=["mme"], task="mme")
    block = LmmsEvalSpec(tasks=["mme"])
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        block.limit = 0
    assert block.limit is None
