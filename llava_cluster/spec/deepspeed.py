"""The DeepSpeed setup a spec resolves to: the shipped preset or the user's JSON (`training.deepspeed`),
deep-merged with `training.deepspeed_overrides`. The one place that reads them: spec validation, model
setup, `plan` and the training job all ask `deepspeed_setup`, so they cannot disagree on the ZeRO stage
or the offload. No torch here: `plan` and spec validation run on the submitting machine.

The presets deliberately define no `optimizer` or `scheduler` section: the HF Trainer then builds ours
(projector at its own learning rate, cosine schedule). The original LLaVA offload config defines its
own optimizer and so silently drops both; a user JSON or overrides that do the same are refused.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_cluster.errors import UserError

if TYPE_CHECKING:
    from llava_cluster.spec.sections import TrainingSpec

DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")
# DeepSpeed config sections we build ourselves from the spec: the one rule for overrides and user JSON.
DEEPSPEED_OWN_SECTIONS = ("optimizer", "scheduler")
ZERO_STAGES = (0, 1, 2, 3)


def deepspeed_section_refused(config: Mapping[str, Any]) -> str | None:
    """Why a DeepSpeed config (preset + user JSON + overrides) cannot be used, or None. An optimizer or
    scheduler section of its own would silently replace the projector learning rate and our schedule."""
    for section in DEEPSPEED_OWN_SECTIONS:
        if section in config:
            return (f"defines its own '{section}', which would silently replace the projector learning rate and "
                    "the optim.scheduler schedule; remove that section (llava-cluster builds both from the "
                    "spec's optim: settings)")
    return None


def _precision_refused(config: Mapping[str, Any], precision: str) -> str | None:
    """A config that switches bf16 or fp16 on or off against training.precision. The presets say "auto"
    and take the spec's; a fixed value that disagrees stops the HF Trainer when the job starts."""
    for name in ("bf16", "fp16"):
        section = config.get(name)
        enabled = section.get("enabled", "auto") if isinstance(section, Mapping) else "auto"
        if enabled != "auto" and bool(enabled) != (precision == name):
            return (f"sets {name}.enabled={json.dumps(enabled)} but training.precision is {precision}; set it to "
                    "\"auto\" (training.precision decides)")
    return None


@dataclass(frozen=True)
class DeepSpeedSetup:
    """The merged DeepSpeed config and what it decides for the rest of llava-cluster."""

    config: dict[str, Any]

    @property
    def _zero(self) -> Mapping[str, Any]:
        return self.config.get("zero_optimization") or {}

    @property
    def stage(self) -> int:
        return int(self._zero.get("stage", 0))

    def _offloaded(self, what: str) -> bool:
        return (self._zero.get(what) or {}).get("device", "none") not in (None, "none")

    @property
    def offload_optimizer(self) -> bool:
        return self._offloaded("offload_optimizer")

    @property
    def offload(self) -> bool:
        """Optimizer state or parameters live on the CPU."""
        return self.offload_optimizer or self._offloaded("offload_param")

    @property
    def allows_device_map(self) -> bool:
        """ZeRO-3 partitions the weights while they load, which rules out placing them with a device_map."""
        return self.stage != 3


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_setup(training: TrainingSpec) -> DeepSpeedSetup:
    """Read the preset or JSON, merge the overrides, refuse what cannot run; UserErrors name the field."""
    name = training.deepspeed
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
    if not isinstance(config, dict):
        raise UserError(f"training.deepspeed: {source} is not a JSON object (a DeepSpeed config)")
    setup = DeepSpeedSetup(_deep_merge(config, training.deepspeed_overrides))
    why = deepspeed_section_refused(setup.config) or _precision_refused(setup.config, training.precision)
    if not why and setup._zero.get("stage", 0) not in ZERO_STAGES:
        why = f"sets zero_optimization.stage={json.dumps(setup._zero['stage'])}; ZeRO stages are 0, 1, 2 and 3"
    if why:
        raise UserError(f"training.deepspeed: {source} {why}")
    return setup


def visible_deepspeed_setup(training: TrainingSpec) -> DeepSpeedSetup | None:
    """The setup, or None while a user JSON is not on this machine (e.g. on a volume only the cluster
    mounts): preflight, and on the cluster the train stage, report a file that is missing there."""
    if training.deepspeed not in DEEPSPEED_PRESETS and not Path(training.deepspeed).is_file():
        return None
    return deepspeed_setup(training)
