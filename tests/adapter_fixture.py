"""Adapters made for merge tests, and the reference they must merge to (PEFT's own merge_and_unload)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from llava_cluster.adapter import PROJECTOR_FILE
from llava_cluster.spec import DEFAULT_LORA_TARGETS


def make_adapter(base: Path, out: Path, r: int = 4, alpha: float = 8.0, seed: int = 1, **lora_kw) -> None:
    """Our adapter layout, with non-zero B (a fresh LoRA merges to a no-op and would prove nothing)
    and a perturbed projector in non_lora_trainables.safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=DEFAULT_LORA_TARGETS,
                                                  init_lora_weights=False, **lora_kw))
    peft_model.save_pretrained(out)
    projector = {k: (v + 0.01 * torch.randn_like(v)).contiguous() for k, v in model.state_dict().items()
                 if ".multi_modal_projector." in k}
    save_file(projector, out / PROJECTOR_FILE)


def peft_merge(base: Path, adapter: Path, dtype: torch.dtype):
    """The reference: load, PeftModel.from_pretrained, merge_and_unload, then load the projector."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    projector = load_file(adapter / PROJECTOR_FILE)
    merged.load_state_dict({k: v.to(dtype) for k, v in projector.items()}, strict=False)
    return merged.state_dict()


def loaded_state(path: Path, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).state_dict()


def assert_bitwise_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    differing = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert differing == []


def perturbed_adapter(spec, out: Path, metadata: dict, seed: int = 1) -> Path:
    """`spec`'s model set up for training, every trainable tensor moved off its initial value (so LoRA
    B is non-zero and the projector differs from the base), saved as training saves it: `out`."""
    from llava_cluster.train.artifacts import gather_trainable_state, write_artifacts
    from llava_cluster.train.model_setup import build_model

    model = build_model(spec)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    write_artifacts(model, gather_trainable_state(model), out, metadata)
    return out
