"""The DeepSpeed config the training job hands to TrainingArguments: the spec's DeepSpeed setup
(`spec/deepspeed.py`: preset or user JSON + overrides, refused when it cannot run), read the same way
by spec validation, model setup and `plan`."""

from __future__ import annotations

from typing import Any

from llava_cluster.spec import DeepSpeedSetup, RunSpec, deepspeed_setup


def load_deepspeed_config(spec: RunSpec) -> dict[str, Any]:
    return deepspeed_setup(spec.training).config


def offloads_optimizer(config: dict[str, Any]) -> bool:
    return DeepSpeedSetup(config).offload_optimizer
