"""Build the trainable model: base LLaVA (+ 4-bit for QLoRA), LoRA on the language model only,
the family's non-LoRA trainables (the projector; LLaVA-NeXT's image_newline too) fully trainable,
the vision tower frozen."""

from __future__ import annotations

from typing import Any

import torch

from llava_cluster.model.family import FAMILIES
from llava_cluster.precision import torch_dtype
from llava_cluster.spec import RunSpec, deepspeed_setup

PROJECTOR = "multi_modal_projector"  # the optimizer group at the projector learning rate


def hold_trainables_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The one precision rule: every trainable tensor (LoRA A/B, the projector) lives on the model in
    the compute dtype; under bf16/fp16 DeepSpeed keeps the fp32 master copy and the Adam moments.

    Training always runs under DeepSpeed, whose ZeRO-1/2/3 optimizers (and its bf16/fp16 optimizers
    without ZeRO) flatten the trainables into one low-precision buffer per rank and update an fp32
    copy of it, so nothing is lost by holding them in bf16. A mix is fatal: PEFT creates LoRA in fp32
    while the projector loads in bf16, and ZeRO-3 (whose loaded weights are already partitioned, so it
    casts nothing itself) stops in `defragment` on the two dtypes. ZeRO-2 casts every parameter itself;
    this makes ZeRO-3, QLoRA (whose kbit preparation upcasts to fp32) and checkpoints agree with it.
    """
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != dtype:
            if hasattr(param, "ds_id"):  # partitioned at load: its dtype came from the DeepSpeed config
                raise RuntimeError(f"{name} was partitioned as {param.dtype}, training runs in {dtype}")
            param.data = param.data.to(dtype)


def qlora_device_map(spec: RunSpec, local_rank: int) -> dict[str, Any] | None:
    """Each rank holds its own 4-bit copy on its GPU, unless the DeepSpeed setup rules a device_map out."""
    if not torch.cuda.is_available():
        return None
    wanted = spec.training.device_map
    if wanted is None:
        wanted = deepspeed_setup(spec.training).allows_device_map
    return {"": local_rank} if wanted else None


def build_model(spec: RunSpec, local_rank: int = 0) -> torch.nn.Module:
    """Load the base from its path and wrap it for training. Call after TrainingArguments exist, so
    that under ZeRO-3 the weights are partitioned while they load."""
    from peft import prepare_model_for_kbit_training

    from llava_cluster.model.load import load_llava

    dtype = torch_dtype(spec.training.precision)
    if spec.method == "qlora":
        model = load_llava(
            spec.model.base, dtype=dtype, load_in_4bit=True, compute_dtype=dtype,
            device_map=qlora_device_map(spec, local_rank),
        )
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        model = load_llava(spec.model.base, dtype=dtype)
    return wrap_for_training(model, spec)


def wrap_for_training(model: torch.nn.Module, spec: RunSpec) -> torch.nn.Module:
    """LoRA on the language model, projector trainable, vision tower frozen, all trainables in the
    compute dtype (`hold_trainables_in`); no KV cache (a cache would also turn off transformers'
    packed-sequence masks). Shared with benchmarks/train_throughput.py."""
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    model.config.text_config.use_cache = False

    lora = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    family = FAMILIES[model.config.model_type]
    model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        if family.is_trainable(name):
            param.requires_grad_(True)
        elif family.vision in name:
            param.requires_grad_(False)
    hold_trainables_in(model, torch_dtype(spec.training.precision))
    return model


def trainable_summary(model: torch.nn.Module) -> dict[str, int]:
    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    counts = {"lora": 0, "projector": 0, "total": 0}
    for name, param in model.named_parameters():
        n = numel(param)
        counts["total"] += n
        if param.requires_grad:
            counts["lora" if "lora_" in name else "projector"] += n
    return counts
