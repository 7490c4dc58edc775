"""The checks a merge must pass before its output appears.

The in-memory merge checks the merged model's logits against base + adapter on a fixed probe batch
(`probe_inputs`, `probe_logits`); that needs both models whole, which is exactly what the streaming
merge exists to avoid. A streamed output is verified tensor by tensor instead (`verify_streamed`),
never holding more than one base tensor in memory; each tensor is checked on its own against the base
and the adapter:

  LoRA target weight   a fixed random probe x goes through it: x @ Mᵀ against x @ Wᵀ + ((x @ Aᵀ) @ Bᵀ)·s,
                       computed in fp32 in the other order from the merge's (B @ A first), so a wrong
                       scaling, a missed or doubled delta, or a swapped pair shows up
  projector tensor     equal to the trained projector (all non-LoRA trainables of the family, e.g.
                       LLaVA-NeXT's image_newline too), cast to the output dtype
  any other tensor     equal to the base tensor, cast to the output dtype (bitwise)

The relative error of the probe outputs must stay under the merge tolerance of the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cluster.adapter import LazyAdapter
from llava_cluster.data.templates import IMAGE_TOKEN, get_template
from llava_cluster.merge.safetensors_io import read_tensor, shard_files
from llava_cluster.model.load import model_family

# Relative error ‖merged − reference‖ / ‖reference‖ allowed on the probe outputs, by weight dtype.
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 5e-3}
PROBE_ROWS = 8


@dataclass
class TensorCheck:
    checked: int = 0
    lora_weights: int = 0
    max_abs_diff: float = 0.0
    rel_diff: float = 0.0  # the worst relative probe-output error of a LoRA weight
    mismatch: str | None = None  # first tensor that failed, with why


def verify_streamed(base: Path, adapter: Path, out: Path, tolerance: float, seed: int = 0) -> TensorCheck:
    """Check every tensor of the merged checkpoint `out`; stops at the first one out of tolerance."""
    import torch

    family = model_family(base)
    lora = LazyAdapter(adapter)
    projector = lora.projector_keys()
    base_shard = {key: shard for shard, keys in shard_files(base).items() for key in keys}
    generator = torch.Generator().manual_seed(seed)
    result = TensorCheck()
    for shard, keys in shard_files(out).items():
        for key in keys:
            merged = read_tensor(out / shard, key)
            if key not in base_shard:
                result.mismatch = f"{key}: in the merged checkpoint but not in the base"
                return result
            reference = read_tensor(base / base_shard[key], key).to(merged.dtype)
            name = family.memory_name(key)
            module = name.removesuffix(".weight")
            result.checked += 1
            if name in projector:
                expected = read_tensor(lora.projector_path, name).to(merged.dtype)
                if not torch.equal(merged, expected):
                    result.mismatch = f"{key}: differs from the trained projector in {lora.projector_path}"
                    return result
            elif name.endswith(".weight") and module in lora.pairs:
                pair = lora.pairs[module]
                a, b = lora.factors(module)
                x = torch.randn(PROBE_ROWS, merged.shape[1], generator=generator)
                want = x @ reference.float().T + ((x @ a.T) @ b.T) * pair.scaling
                got = x @ merged.float().T
                diff = got - want
                rel = float(diff.norm() / want.norm().clamp_min(1e-12))
                result.lora_weights += 1
                result.max_abs_diff = max(result.max_abs_diff, float(diff.abs().max()))
                result.rel_diff = max(result.rel_diff, rel)
                if rel > tolerance:
                    result.mismatch = f"{key}: probe output differs from base + adapter by {rel:.2e} (relative)"
                    return result
            elif not torch.equal(merged, reference):
                result.mismatch = f"{key}: not a LoRA target nor the projector, yet differs from the base"
                return result
    if result.lora_weights != len(lora.pairs):
        result.mismatch = (f"{len(lora.pairs) - result.lora_weights} of the adapter's {len(lora.pairs)} LoRA "
                           "weights are not in the merged checkpoint")
    return result


def probe_inputs(processor: Any, template: str = "vicuna_v1") -> dict[str, Any]:
    """A fixed probe batch (one image prompt, one text-only prompt) for comparing two models' logits."""
    import numpy as np
    from PIL import Image

    # CLIP processors crop to a square; SigLIP ones (OneVision) have crop_size None and resize instead.
    size = (getattr(processor.image_processor, "crop_size", None) or {}).get("height", 32)
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // max(size - 1, 1), y * 255 // max(size - 1, 1), (x + y) % 256], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8))
    tmpl = get_template(template)
    prompts = [
        tmpl.prompt([("user", f"{IMAGE_TOKEN}\nWhat colour is the shape?")]),
        tmpl.prompt([("user", "Say the word after: apple")]),
    ]
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = processor(text=prompts, images=[image], padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return dict(batch)


def probe_logits(model: Any, batch: dict[str, Any]) -> Any:
    """The model's fp32 logits on the probe batch, on the model's device."""
    import torch

    with torch.no_grad():
        return model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float()
