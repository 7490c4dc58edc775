"""Verify a streamed merge tensor by tensor, never holding more than one base tensor in memory.

The in-memory merge checks the merged model's logits against base + adapter on a probe batch; that
needs both models whole, which is exactly what the streaming merge exists to avoid. Here every tensor
of the output is checked on its own against the base and the adapter:

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

from llava_cluster.merge_streaming import ADAPTER_WEIGHTS, Adapter, memory_name, read_tensor, shard_files
from llava_cluster.model.load import model_family

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
    from safetensors import safe_open

    family = model_family(base)
    lora = Adapter(adapter)
    projector: set[str] = set()
    if lora.projector_path:
        with safe_open(lora.projector_path, "pt") as fh:
            projector = set(fh.keys())
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
            name = memory_name(key, family)
            module = name.removesuffix(".weight")
            result.checked += 1
            if name in projector:
                expected = read_tensor(lora.projector_path, name).to(merged.dtype)
                if not torch.equal(merged, expected):
                    result.mismatch = f"{key}: differs from the trained projector in {lora.projector_path}"
                    return result
            elif name.endswith(".weight") and module in lora.pairs:
                pair = lora.pairs[module]
                a = read_tensor(adapter / ADAPTER_WEIGHTS, pair.a_key).float()
                b = read_tensor(adapter / ADAPTER_WEIGHTS, pair.b_key).float()
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
