"""`llava-cluster plan SPEC`: will this run fit in GPU memory, and what is the largest batch that does?

An out-of-memory error after a job waited hours in a queue is the most expensive way to learn a batch
size. The estimate is arithmetic on the shapes in the base's config.json (no weights are read):

  weights      bf16/fp16/fp32, or NF4 + double-quant for the LM's linear layers (QLoRA; the rest is
               fp32 after prepare_model_for_kbit_training); ZeRO-3 splits them across ranks
  trainable    LoRA + projector: parameters, gradients, AdamW moments (+ fp32 master copies under
               DeepSpeed), split across ranks as the ZeRO stage says (offload moves them to the CPU)
  activations  per token and layer, from what the LoRA'd Llama layer keeps for backward; with
               gradient checkpointing only each layer's input
  transient    the larger of the logits chain (vocab x tokens: logits, their fp32 copy, its gradient)
               and, with checkpointing, one recomputed layer plus the gradients through it
  overhead     CUDA context, allocator fragmentation, library workspaces

Its constants were checked against peaks measured on an H200 (plain transformers + PEFT, sdpa, bf16,
single GPU, see tests/test_plan.py): LLaVA-1.5-7B LoRA r=128 16x832 and 16x1600 with checkpointing,
8x832 without, QLoRA 7B 16x832, QLoRA 13B 4x2048 — all within 15%.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from llava_cluster.errors import UserError
from llava_cluster.precision import ELEMENT_BYTES

GIB = 1024**3
# Memory a process can allocate (GiB, as nvidia-smi reports the card's total).
GPU_MEMORY_GIB = {
    "H200-141GB": 139.8,
    "H100-94GB": 93.6,
    "H100-80GB": 79.6,
    "A100-80GB": 79.2,
    "A100-40GB": 39.4,
    "L40S-48GB": 44.4,
    "A6000-48GB": 47.4,
    "L4-24GB": 22.0,
    "A10-24GB": 22.0,
    "RTX4090-24GB": 23.6,
    "V100-32GB": 31.7,
}
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values + 8-bit absmax per 64 + fp32 per 256 absmax
CUDA_CONTEXT_GIB = 0.6
FRAGMENTATION = 1.05
RECOMPUTE_FACTOR = 1.5  # a recomputed layer's saved tensors + the gradients through it (calibrated)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a LLaVA config: the LM, the vision tower and the projector."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    image_tiles: int = 1  # vision-tower passes per image: any-resolution's most tiles + the base image

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each LM linear layer per decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def lm_linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def lm_other_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def vision_params(self) -> int:
        hv, iv, p = self.vision_hidden, self.vision_intermediate, self.patch_size
        per_layer = 4 * hv * hv + 4 * hv + 2 * hv * iv + iv + hv + 4 * hv
        return self.vision_layers * per_layer + 3 * p * p * hv + (self.image_tokens + 2) * hv + 4 * hv

    def projector_params(self) -> int:
        return self.vision_hidden * self.hidden + self.hidden * self.hidden + 2 * self.hidden


def _llama(layers: int, hidden: int, intermediate: int, heads: int) -> ModelShape:
    return ModelShape(layers, hidden, intermediate, heads, heads, hidden // heads, 32064, False,
                      24, 1024, 4096, 336, 14)


def anyres_tiles(config: dict[str, Any]) -> int:
    """Most tiles of one image: 1 (fixed-size families), else the base image + the largest grid of
    `image_grid_pinpoints` in units of the vision tower's input side."""
    from llava_cluster.model.family import family_of

    if not family_of(config).anyres:
        return 1
    side = config["vision_config"]["image_size"]
    pinpoints = config.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    return 1 + max((h // side) * (w // side) for h, w in pinpoints)


def _onevision(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
               tied: bool) -> ModelShape:
    """Qwen2 + the SigLIP so400m tower at 384 px as llava-hf configures it (LlavaOnevisionConfig's
    default vision_config). anyres_max_9 scales a grid's features down after the tower and projector,
    so both still see the 6x6 grid's 36 tiles + the base image (anyres_tiles of its pinpoints)."""
    return ModelShape(layers, hidden, intermediate, heads, kv_heads, hidden // heads, vocab, tied,
                      26, 1152, 4304, 384, 14, image_tiles=1 + 6 * 6)


# LLaVA-1.5: Llama-2 7B/13B (vocabulary padded to 32064) + CLIP ViT-L/14 at 336 px. LLaVA-NeXT
# (llava-v1.6-mistral-7b-hf): Mistral-7B (GQA, 8 KV heads) + the same tower, up to 4 tiles + base.
# LLaVA-OneVision (llava-onevision-qwen2-0.5b/7b-ov-hf): Qwen2-0.5B (tied embeddings) / Qwen2-7B.
PRESETS = {"7b": _llama(32, 4096, 11008, 32), "13b": _llama(40, 5120, 13824, 40),
           "next-mistral-7b": replace(_llama(32, 4096, 14336, 32), kv_heads=8, image_tiles=5),
           "next-vicuna-13b": replace(_llama(40, 5120, 13824, 40), image_tiles=5),
           "onevision-qwen2-0.5b": _onevision(24, 896, 4864, 14, 2, 151936, tied=True),
           "onevision-qwen2-7b": _onevision(28, 3584, 18944, 28, 4, 152064, tied=False)}
PRESET_NAMES = sorted(PRESETS)  # the --model-shape choices, as the CLI and its errors list them


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    text, vision = config.get("text_config"), config.get("vision_config")
    if not text or not vision:
        raise UserError("config.json has no text_config/vision_config: not a Hugging Face LLaVA checkpoint")
    heads = text.get("num_attention_heads", 32)
    return ModelShape(
        layers=text["num_hidden_layers"], hidden=text["hidden_size"], intermediate=text["intermediate_size"],
        heads=heads, kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // heads, vocab=text["vocab_size"],
        tied=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        vision_layers=vision["num_hidden_layers"], vision_hidden=vision["hidden_size"],
        vision_intermediate=vision["intermediate_size"], image_size=vision["image_size"],
        patch_size=vision["patch_size"], image_tiles=anyres_tiles(config),
    )


@dataclass(frozen=True)
class Setup:
    """The training choices that move memory. zero=0 is plain PyTorch + PEFT (no DeepSpeed)."""

    method: str = "lora"
    r: int = 128
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_MODULES
    batch: int = 16
    max_length: int = 2048
    checkpointing: bool = True
    precision: str = "bf16"
    zero: int = 3
    offload: bool = False
    world: int = 8
    grad_accum: int = 1


@dataclass
class Estimate:
    """Bytes per GPU by component; `peak` is what torch.cuda.max_memory_allocated would report,
    `total` adds the CUDA context and fragmentation (what must fit in the card)."""

    weights: float
    trainable: float
    activations: float  # kept for backward
    transient: float  # the logits chain, or (checkpointing) a recomputed layer, whichever is larger
    buffers: float

    @property
    def peak(self) -> float:
        return self.weights + self.trainable + self.activations + self.transient + self.buffers

    @property
    def total(self) -> float:
        return self.peak * FRAGMENTATION + CUDA_CONTEXT_GIB * GIB


def lora_params(shape: ModelShape, setup: Setup) -> int:
    return shape.layers * sum(setup.r * (a + b) for name, (a, b) in shape.linear_shapes().items()
                              if name in setup.targets)


def _layer_activation_bytes(shape: ModelShape, setup: Setup, act: int) -> float:
    """What one LoRA'd decoder layer keeps for backward, per token. The frozen base linears keep no
    input; each LoRA branch keeps its input upcast to fp32 (plus a 1-byte dropout mask) and its rank-r
    middle; attention keeps q, k, v and its output; the MLP its gate, up and activation outputs; the
    two RMSNorms their fp32 inputs."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = act * (2 * q + 2 * kv)
    mlp = 3 * act * shape.intermediate
    lora_in = sum(a for name, (a, _) in shape.linear_shapes().items() if name in setup.targets)
    lora = (4 + (1 if setup.dropout > 0 else 0)) * lora_in + 4 * setup.r * len(setup.targets)
    norms = 2 * 4 * shape.hidden
    return attention + mlp + lora + norms


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """Per-GPU memory of one training micro-step at its peak (end of forward / start of backward)."""
    act = ELEMENT_BYTES[setup.precision]
    world = max(setup.world, 1)
    qlora = setup.method == "qlora"

    if qlora:  # LM linears in NF4; embeddings, lm_head, norms and the vision tower upcast to fp32
        weights = shape.lm_linear_params() * NF4_BYTES + 4 * (shape.lm_other_params() + shape.vision_params())
    else:
        weights = act * (shape.lm_linear_params() + shape.lm_other_params() + shape.vision_params())
    if setup.zero == 3 and not qlora:
        weights /= world

    lora, proj = lora_params(shape, setup), shape.projector_params()
    late_grads = 0.0  # gradients that appear during backward, after the forward's peak
    if setup.zero == 0:
        # PEFT keeps LoRA in fp32 (autocast_adapter_dtype), the projector in the model's dtype; the
        # gradients exist only during backward unless they are accumulated across micro-batches.
        proj_bytes = 4 if qlora else act
        trainable = lora * (4 + 8) + proj * proj_bytes * 3
        grads = lora * 4 + proj * proj_bytes
        if setup.grad_accum > 1:
            trainable += grads
        else:
            late_grads = grads
    else:
        # DeepSpeed mixed precision: 16-bit params and grads, fp32 master + moments + grad partition.
        n = lora + proj
        sharded = 0 if setup.offload else 16 * n / world
        params = act * n / (world if setup.zero == 3 else 1)
        grads = act * n / (world if setup.zero == 3 else 1)
        trainable = params + grads + sharded

    tokens = setup.batch * setup.max_length
    residual = 4 if qlora else act  # QLoRA's fp32 embeddings make the residual stream fp32
    layer = _layer_activation_bytes(shape, setup, act)
    # LoRA: 16-bit logits, their fp32 copy for the loss, its gradient. QLoRA's fp32 lm_head: fp32
    # logits, their log-softmax, its gradient.
    logits_per_token = shape.vocab * ((4 + 4 + 4) if qlora else (act + 4 + 4))
    images = setup.batch * shape.image_tiles * shape.image_tokens * (shape.vision_hidden + 2 * shape.hidden) * act
    if setup.checkpointing:
        # kept: each layer's input. Transient: first the logits, later one recomputed layer with the
        # gradients flowing through it (about half its size again) while the LoRA gradients fill in.
        activations = tokens * shape.layers * shape.hidden * residual + images
        transient = max(tokens * logits_per_token, tokens * layer * RECOMPUTE_FACTOR + late_grads)
    else:
        activations = tokens * (shape.layers * layer + shape.hidden * residual) + images
        transient = tokens * logits_per_token

    layer_weights = act * shape.lm_linear_params() / shape.layers
    buffers = 0.0
    if setup.zero == 3 and not qlora:
        buffers += 2 * layer_weights  # gathered layers (current + prefetched)
    if setup.zero in (2, 3):
        buffers += 2 * 4 * shape.hidden**2  # reduce bucket ("auto" = hidden^2) in fp32, double-buffered
    if qlora:
        buffers += act * max(a * b for a, b in shape.linear_shapes().values())  # a dequantized weight
    return Estimate(weights, trainable, activations, transient, buffers)


def largest_batch(shape: ModelShape, setup: Setup, gpu_gib: float, limit: int = 4096) -> int:
    """The largest per-device batch whose estimate fits in `gpu_gib`; 0 when not even one sample does."""
    best = 0
    for batch in range(1, limit + 1):
        if estimate(shape, replace(setup, batch=batch)).total > gpu_gib * GIB:
            break
        best = batch
    return best


def setup_from_spec(spec: Any) -> Setup:
    """The spec's choices; the ZeRO stage and offload are those of its DeepSpeed setup, overrides included."""
    from llava_cluster.spec import deepspeed_setup

    targets = tuple(m for m in LORA_MODULES if re.search(rf"\b{m}\b", spec.lora.target_modules))
    deepspeed = deepspeed_setup(spec.training)
    return Setup(
        method=spec.method, r=spec.lora.r, dropout=spec.lora.dropout, targets=targets or LORA_MODULES,
        batch=spec.optim.per_device_batch, max_length=spec.data.max_length,
        checkpointing=spec.training.gradient_checkpointing, precision=spec.training.precision,
        zero=deepspeed.stage, offload=deepspeed.offload, world=spec.world_size, grad_accum=spec.optim.grad_accum,
    )


def gpu_memory_gib(gpu_type: str, override: float | None) -> float:
    if override:
        return override
    if gpu_type not in GPU_MEMORY_GIB:
        raise UserError(
            f"resources.gpu_type {gpu_type!r} is not in the table ({', '.join(GPU_MEMORY_GIB)}); "
            "pass --gpu-memory GiB"
        )
    return GPU_MEMORY_GIB[gpu_type]


def plan(spec: Any, model_shape: str | None = None, gpu_memory: float | None = None,
         zero: int | None = None) -> dict[str, Any]:
    """The estimate, verdict and largest batch for a loaded RunSpec, as a JSON-ready dict."""
    if model_shape:
        shape, source = PRESETS[model_shape], f"preset {model_shape}"
    else:
        from llava_cluster.preflight import model_problems

        cfg_path = Path(spec.model.base) / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"model.base: {cfg_path} not found; plan without a checkpoint with "
                            f"--model-shape {'|'.join(PRESET_NAMES)}")
        refused = model_problems(spec)
        if refused:
            raise UserError("; ".join(refused))
        shape, source = shape_from_config(json.loads(cfg_path.read_text())), str(cfg_path)
    setup = setup_from_spec(spec)
    if zero is not None:
        setup = replace(setup, zero=zero, offload=False)
    gib = gpu_memory_gib(spec.resources.gpu_type, gpu_memory)
    est = estimate(shape, setup)
    no_ckpt = estimate(shape, replace(setup, checkpointing=not setup.checkpointing))
    return {
        "model": source,
        "gpu": {"type": spec.resources.gpu_type, "memory_gib": gib, "count": setup.world},
        "setup": asdict(setup),
        "gib": {k: round(v / GIB, 2) for k, v in {**asdict(est), "peak": est.peak, "total": est.total}.items()},
        "fits": est.total <= gib * GIB,
        "largest_batch": largest_batch(shape, setup, gib),
        "other_checkpointing_total_gib": round(no_ckpt.total / GIB, 2),
        "trainable_params": lora_params(shape, setup) + shape.projector_params(),
    }


EPILOG = """\
examples:
  llava-cluster plan jobs/lora-13b-multinode.yaml
  llava-cluster plan jobs/qlora-13b-1node.yaml --model-shape 13b --gpu-memory 48
  llava-cluster plan my-run.yaml optim.per_device_batch=32 --json

`peak` is comparable to torch.cuda.max_memory_allocated(); `total` adds the CUDA context and allocator
fragmentation and is what must fit. Estimates are worst case: every sample at data.max_length.
"""


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Estimate per-GPU memory of a run spec (weights, LoRA + optimizer state, "
                          "activations, logits), say whether it fits its GPUs and the largest per-device batch.")
    parser.epilog = EPILOG
    parser.add_argument("spec", type=Path, help="run spec YAML")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override spec values, e.g. optim.lr=1e-4")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="the same, one per -o (repeatable)")
    parser.add_argument("--model-shape", choices=PRESET_NAMES,
                        help="plan for a preset shape (LLaVA-1.5, -NeXT, -OneVision) without reading model.base")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB", help="GPU memory instead of resources.gpu_type's")
    parser.add_argument("--zero", type=int, choices=(0, 2, 3),
                        help="ZeRO stage instead of training.deepspeed's (0: plain PyTorch, no DeepSpeed)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llava_cluster.console import console
    from llava_cluster.spec import load_spec

    spec = load_spec(args.spec, [*args.override, *args.overrides])
    result = plan(spec, args.model_shape, args.gpu_memory, args.zero)
    if args.json:
        console.print_json(json.dumps(result))
        return 0 if result["fits"] else 1
    from rich.table import Table

    s, g = result["setup"], result["gib"]
    console.print(f"[bold]{spec.name}[/]: {s['method']} r={s['r']}, {s['batch']}x{s['max_length']} tokens per GPU, "
                  f"ZeRO-{s['zero']}{' offload' if s['offload'] else ''}, {s['world']} GPU(s), "
                  f"{result['trainable_params'] / 1e6:.0f}M trainable ({result['model']})", highlight=False)
    table = Table()
    table.add_column("per GPU")
    table.add_column("GiB", justify="right")
    for key in ("weights", "trainable", "activations", "transient", "buffers", "peak", "total"):
        table.add_row(key, f"{g[key]:.1f}", style="bold" if key == "total" else None)
    console.print(table)
    other = "without" if s["checkpointing"] else "with"
    console.print(f"{other} gradient checkpointing: {result['other_checkpointing_total_gib']:.1f} GiB")
    gpu = result["gpu"]
    verdict = "[green]fits[/]" if result["fits"] else "[red]does not fit[/]"
    console.print(f"{gpu['type']} ({gpu['memory_gib']:.0f} GiB): {verdict}; largest per-device batch that fits: "
                  f"{result['largest_batch']}")
    return 0 if result["fits"] else 1
