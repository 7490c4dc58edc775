"""`llava-cluster convert adapter`: an original LoRA output (`--lora_enable`: adapter + non_lora_trainables)
-> llava-cluster's adapter layout (`llava_cluster/adapter.py`), onto a base made by `convert original`.

LoRA keys are renamed to the HF LLaVA module names, target_modules are anchored to the language model
(CLIP's layers share the q/k/v names) and every tensor is checked against the base, so a wrong base
fails here, not at merge time. Pickles are read only when the caller allows it, tensors only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llava_cluster.adapter import ADAPTER_CONFIG, LORA_STEM, NON_LORA_STEM, write_adapter
from llava_cluster.convert.original import original_name
from llava_cluster.errors import UserError
from llava_cluster.rundir import atomic_dir


def _read_one(folder: Path, stem: str, allow_pickle: bool) -> dict[str, Any]:
    """`stem`.safetensors, else `stem`.bin (a pickle: only with allow_pickle, tensors only)."""
    import torch
    from safetensors.torch import load_file

    st, pkl = folder / f"{stem}.safetensors", folder / f"{stem}.bin"
    if st.is_file():
        return load_file(st)
    if not pkl.is_file():
        raise UserError(f"{folder}: neither {st.name} nor {pkl.name} found")
    if not allow_pickle:
        raise UserError(
            f"{pkl} is a pickle, and loading a pickle can run code. Pass --allow-pickle to read it with "
            "torch.load(weights_only=True), which accepts tensors only; the output is safetensors."
        )
    try:
        return torch.load(pkl, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{pkl}: not a plain tensor pickle ({err.__class__.__name__}: {err})") from None


def _lora_name(key: str) -> str:
    m = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
    if not m:
        raise UserError(
            f"adapter tensor {key!r} is not a LoRA weight of the language model's layers; only adapters "
            "of the original LLaVA `--lora_enable` training are supported"
        )
    layer, module, ab = m.groups()
    return f"base_model.model.model.language_model.layers.{layer}.{module}.{ab}.weight"


def _projector_name(key: str) -> str:
    bare = key.removeprefix("base_model.model.")
    if not bare.startswith("model.mm_projector."):
        raise UserError(
            f"{NON_LORA_STEM}: unexpected tensor {key!r} (only the mm_projector is converted; an "
            "adapter that also trained embeddings or the vision tower is not supported)"
        )
    return original_name(bare)


def _lora_config_dict(src_cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    from peft import LoraConfig

    targets = src_cfg.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise UserError(f"{ADAPTER_CONFIG}: target_modules {targets!r} is not a list of module names")
    names = sorted({t.rsplit(".", 1)[-1] for t in targets})
    known = {f.name for f in LoraConfig.__dataclass_fields__.values()}
    kwargs = {k: v for k, v in src_cfg.items() if k in known and k not in ("peft_version", "auto_mapping")}
    kwargs.update(
        # Anchored to the language model: CLIP's layers use the same q/k/v names.
        target_modules=rf".*language_model.*\.({'|'.join(re.escape(n) for n in names)})",
        base_model_name_or_path=str(base),
        inference_mode=True,
    )
    return LoraConfig(**kwargs).to_dict()


def convert_adapter(
    src: Path, base: Path, out: Path, allow_pickle: bool = False, template: str = "vicuna_v1"
) -> dict[str, Any]:
    """Original `--lora_enable` output (adapter + non_lora_trainables) -> our adapter layout, checked
    tensor by tensor against the converted base so a wrong base fails here, not at merge time."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    src, base, out = Path(src), Path(base), Path(out)
    cfg_path = src / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise UserError(f"{src}: no {ADAPTER_CONFIG} (not a LoRA output folder)")
    from llava_cluster.model.load import read_llava_config

    read_llava_config(base)
    src_cfg = json.loads(cfg_path.read_text())
    lora = {_lora_name(k): v.contiguous() for k, v in _read_one(src, LORA_STEM, allow_pickle).items()}
    if not any((src / f"{NON_LORA_STEM}.{ext}").is_file() for ext in ("bin", "safetensors")):
        raise UserError(
            f"{src}: no {NON_LORA_STEM}.bin. The projector trained with the adapter is in that file; "
            "merging without it would silently keep the base projector."
        )
    extra = _read_one(src, NON_LORA_STEM, allow_pickle)
    projector = {_projector_name(k): v.contiguous() for k, v in extra.items()}

    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(AutoConfig.from_pretrained(base))
    params = dict(model.named_parameters())
    problems = []
    for key, tensor in lora.items():
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        weight = params.get(f"{module}.weight")
        side = 1 if ".lora_A." in key else 0
        if weight is None or weight.shape[side] != tensor.shape[side]:
            problems.append(f"{key} {tuple(tensor.shape)}")
    problems += [f"{k} {tuple(v.shape)}" for k, v in projector.items()
                 if k not in params or params[k].shape != v.shape]
    if problems:
        raise UserError(f"{src} does not fit the base {base}: {len(problems)} tensor(s), e.g. {problems[0]}")

    config = _lora_config_dict(src_cfg, base)
    meta = {
        "format_version": 1,
        "base": str(base),
        "template": template,
        "method": "lora",
        "spec_digest": None,
        "converted_from": str(src),
        "lora": {"r": config["r"], "alpha": config["lora_alpha"], "dropout": config["lora_dropout"],
                 "target_modules": config["target_modules"]},
    }
    with atomic_dir(out) as tmp:
        write_adapter(tmp, config, lora, projector, meta)
    return {**meta, "lora_tensors": len(lora), "projector_tensors": len(projector)}
