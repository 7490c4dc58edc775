"""What a trained adapter folder is: the one definition training writes, and merge, validate and
convert read.

    adapter_config.json, adapter_model.safetensors   the LoRA adapter, PEFT layout
    non_lora_trainables.safetensors                  the projector (+ image_newline for LLaVA-NeXT: every
                                                     tensor the family trains fully), keys as in the
                                                     family's model class
    llava_cluster.json                               base path, template, method, spec digest, LoRA shape

Original LLaVA `--lora_enable` outputs use the same stems with pickles (`*.bin`); `llava-cluster
convert adapter` turns them into this layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cluster.errors import UserError
from llava_cluster.rundir import atomic_write_json, atomic_write_text

LORA_STEM = "adapter_model"
NON_LORA_STEM = "non_lora_trainables"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = f"{LORA_STEM}.safetensors"
PROJECTOR_FILE = f"{NON_LORA_STEM}.safetensors"
METADATA_FILE = "llava_cluster.json"
# What merge and validate need; a training save (and a converted adapter) adds the metadata.
REQUIRED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTOR_FILE)
ADAPTER_FILES = (*REQUIRED_FILES, METADATA_FILE)
PEFT_PREFIX = "base_model.model."
_LORA_A = re.compile(re.escape(PEFT_PREFIX) + r"(.+)\.lora_A\.weight")
_LORA_B = re.compile(re.escape(PEFT_PREFIX) + r"(.+)\.lora_B\.weight")


def write_non_lora(folder: Path, tensors: dict[str, Any]) -> None:
    """The fully trained tensors (projector, image_newline), under the base model's in-memory names."""
    from safetensors.torch import save_file

    save_file(tensors, str(Path(folder) / PROJECTOR_FILE), metadata={"format": "pt"})


def write_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / METADATA_FILE, metadata)


def write_adapter(folder: Path, config: dict[str, Any], lora: dict[str, Any], non_lora: dict[str, Any],
                  metadata: dict[str, Any]) -> None:
    """All four files from a PEFT config dict and tensors already under PEFT names (a converted
    adapter; training saves its LoRA through PEFT's own `save_pretrained`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
    save_file(lora, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_non_lora(folder, non_lora)
    write_metadata(folder, metadata)


def check_adapter(adapter_dir: str | Path) -> Path:
    """Fail with one clear message when an adapter folder is not a complete llava-cluster save."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder not found: {adapter_dir}")
    missing = [f for f in REQUIRED_FILES if not (adapter_dir / f).is_file()]
    if missing:
        hint = ""
        if (adapter_dir / f"{NON_LORA_STEM}.bin").exists():
            hint = " (original LLaVA output: convert it with `llava-cluster convert adapter`)"
        raise UserError(f"{adapter_dir} is not a complete adapter: missing {', '.join(missing)}{hint}")
    return adapter_dir


def is_adapter(folder: Path) -> bool:
    """An adapter folder (rather than a merged checkpoint): it has a PEFT config."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def read_metadata(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / METADATA_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def load_non_lora(adapter_dir: str | Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / PROJECTOR_FILE))


def apply_projector(model: Any, adapter_dir: str | Path) -> list[str]:
    """Copy the trained projector (and the family's other non-LoRA trainables) into a base model (not
    yet PEFT-wrapped).
    Fails loudly when a key does not exist or the shape differs: a projector left at its base
    values is the silent failure this product exists to prevent."""
    import torch

    weights = load_non_lora(adapter_dir)
    params = dict(model.named_parameters())
    problems = [k for k in weights if k not in params]
    problems += [f"{k} {tuple(weights[k].shape)} vs {tuple(params[k].shape)}"
                 for k in weights if k in params and weights[k].shape != params[k].shape]
    if problems:
        raise UserError(f"projector in {adapter_dir} does not fit this base model: {problems[:3]}")
    with torch.no_grad():
        for key, value in weights.items():
            params[key].copy_(value.to(params[key].dtype))
    return sorted(weights)


def load_with_adapter(base: str | Path, adapter_dir: str | Path, dtype: Any, dequantized: bool = False) -> Any:
    """Base + trained non-LoRA tensors + LoRA as PEFT holds them (unmerged): the model that was trained.
    `dequantized` loads the base 4-bit and dequantizes it first (a QLoRA adapter's exact base)."""
    from peft import PeftModel

    from llava_cluster.model.load import load_llava

    if dequantized:
        model = load_llava(base, dtype=dtype, load_in_4bit=True, compute_dtype=dtype).dequantize()
    else:
        model = load_llava(base, dtype=dtype)
    apply_projector(model, adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir))


@dataclass(frozen=True)
class LoraPair:
    a_key: str
    b_key: str
    scaling: float


class LazyAdapter:
    """An adapter folder opened lazily, for merging one tensor at a time: the LoRA A/B tensors of a
    module are read only when its weight is merged. Plain LoRA only: the streaming merge's arithmetic
    does not cover DoRA, fan-in-fan-out, biases or per-module ranks."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        folder = Path(folder)
        cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        for p in (cfg_path, weights):
            if not p.is_file():
                raise UserError(f"{folder}: not an adapter folder, {p.name} is missing")
        cfg = json.loads(cfg_path.read_text())
        self._check_supported(folder, cfg)
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        scaling = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r
        self._weights = weights
        with safe_open(weights, "pt") as fh:
            keys = list(fh.keys())
        self.pairs: dict[str, LoraPair] = {}
        for key in keys:
            m = _LORA_A.fullmatch(key)
            if m:
                self.pairs[m.group(1)] = LoraPair(key, key.replace(".lora_A.", ".lora_B."), scaling)
            elif not _LORA_B.fullmatch(key):
                raise UserError(
                    f"{weights}: unexpected tensor {key!r}; the streaming merge handles plain LoRA A/B "
                    f"weights only (modules_to_save belong in {PROJECTOR_FILE})"
                )
        self.projector_path = folder / PROJECTOR_FILE if (folder / PROJECTOR_FILE).is_file() else None

    @staticmethod
    def _check_supported(folder: Path, cfg: dict[str, Any]) -> None:
        unsupported = [
            name for name, bad in (
                ("use_dora", cfg.get("use_dora")),
                ("fan_in_fan_out", cfg.get("fan_in_fan_out")),
                ("lora_bias", cfg.get("lora_bias")),
                ("rank_pattern", cfg.get("rank_pattern")),
                ("alpha_pattern", cfg.get("alpha_pattern")),
            ) if bad
        ]
        if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
            raise UserError(
                f"{folder}/{ADAPTER_CONFIG}: {', '.join(unsupported) or cfg.get('peft_type')} is not "
                "supported by the streaming merge; merge in memory instead (merge without --streaming)"
            )

    def projector_keys(self) -> set[str]:
        """Names of the trained non-LoRA tensors (none when the folder has no such file)."""
        from safetensors import safe_open

        if not self.projector_path:
            return set()
        with safe_open(self.projector_path, "pt") as fh:
            return set(fh.keys())

    def factors(self, module: str) -> tuple[Any, Any]:
        """(A, B) of `module` in fp32, the file opened just for them (see merge.safetensors_io.read_tensor
        for why files are not kept open)."""
        from safetensors import safe_open

        pair = self.pairs[module]
        with safe_open(self._weights, "pt") as fh:
            return fh.get_tensor(pair.a_key).float(), fh.get_tensor(pair.b_key).float()

    def delta(self, module: str) -> Any:
        """(B @ A) * scaling in fp32, exactly as PEFT computes it for an fp32-held adapter."""
        a, b = self.factors(module)
        return (b @ a) * self.pairs[module].scaling
