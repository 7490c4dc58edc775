"""DeepSpeed configs: shipped presets (zero2, zero3, zero3_offload) or a user JSON, plus overrides.

The presets deliberately define no `optimizer` or `scheduler` section: the HF Trainer then builds ours
(projector at its own learning rate, cosine schedule). The original LLaVA offload config defines its
own optimizer and so silently drops both; a user JSON that does the same is refused (the rule,
`spec.deepspeed_section_refused`, also refuses such `deepspeed_overrides` when the spec is loaded).
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

from llava_cluster.errors import UserError
from llava_cluster.spec import DEEPSPEED_PRESETS, RunSpec, deepspeed_section_refused


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_deepspeed_config(spec: RunSpec) -> dict[str, Any]:
    name = spec.training.deepspeed
    if name in DEEPSPEED_PRESETS:
        text = resources.files("llava_cluster.train").joinpath(f"deepspeed_configs/{name}.json").read_text()
        source = f"preset {name}"
    else:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"training.deepspeed: file not found: {path}")
        text, source = path.read_text(), str(path)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"training.deepspeed: {source} is not valid JSON: {err}") from None
    config = _deep_merge(config, spec.training.deepspeed_overrides)
    why = deepspeed_section_refused(config)
    if why:
        raise UserError(f"training.deepspeed: {source} {why}")
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(config: dict[str, Any]) -> bool:
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")
