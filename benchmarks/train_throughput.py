"""Training throughput on one GPU: the plain baseline vs our training step, on the same samples.

    python3 benchmarks/train_throughput.py --cases lora-7b,lora-13b      # device machine, ~6 min
    python3 benchmarks/train_throughput.py --cases qlora-7b,qlora-13b    # device machine, ~7 min
    .venv/bin/python benchmarks/train_throughput.py --smoke              # CPU, tiny shapes, ~1 min

Models: LLaVA-1.5-7B / 13B shapes (Llama-2 LM + CLIP ViT-L/14-336 + 2-layer MLP projector) with
random bf16 weights built on the GPU; nothing is downloaded. QLoRA cases save the random model to
local disk once and reload it 4-bit (NF4, double quant, bf16 compute), as a real run would.

Samples: drawn from the LLaVA-1.5 mix length model of benchmarks/packing_efficiency.py (94% one
576-token image + text, 6% text-only, multi-turn included), random token ids, labels on the last
two thirds of each sample's text. Every batch is built on the device before timing.

plain  transformers + PEFT written out here, the anchor's recipe: LoRA r128 α256 dropout 0.05 on
       every LM linear layer, projector trainable, sdpa, gradient checkpointing, fused AdamW;
       micro-batches of `--batch` samples in the anchor's modality-length order, padded to the longest.
ours   the product's step: llava_cluster.train.model_setup (build_model / wrap_for_training), its
       optimizer groups, the packed collator (llava_cluster.train.packing) with rows of
       `--pack-length` tokens, as many rows per micro-batch as hold about the same real tokens.
Both: one optimizer step per micro-batch, no DeepSpeed engine (one GPU: nothing to partition).

Figures: real (non-pad) tokens/s; useful TFLOP/s = (2 × LM forward + vision forward) FLOPs of the
real tokens per second (the frozen base needs no weight gradients; attention counted per sample,
causal); MFU = useful / 790 TFLOP/s (bf16 dense peak measured on the H200); peak GiB = max CUDA
memory allocated during the timed steps. Full results go to $OUT/train_throughput.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packing_efficiency import anchor_order, llava_mix  # noqa: E402

PEAK_TFLOPS = 790.0
IGNORE = -100


@dataclass
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 32064
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    image_size: int = 336
    patch: int = 14
    length_scale: float = 1.0  # smoke shapes shrink text lengths too

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


SHAPES = {
    "7b": Shape("7b", 4096, 11008, 32, 32),
    "13b": Shape("13b", 5120, 13824, 40, 40),
    "smoke": Shape("smoke", 64, 172, 2, 4, vocab=1000, vision_hidden=32, vision_intermediate=64, vision_layers=2,
                   vision_heads=2, image_size=56, patch=14, length_scale=0.05),
}


@dataclass
class Case:
    name: str
    shape: str
    method: str  # lora | qlora
    batch: int  # plain: samples per micro-batch (the anchor's per-device batch where it fits)
    extra: dict[str, Any] = field(default_factory=dict)


CASES = {
    "lora-7b": Case("lora-7b", "7b", "lora", 16),
    "lora-13b": Case("lora-13b", "13b", "lora", 16),
    "qlora-7b": Case("qlora-7b", "7b", "qlora", 16),
    "qlora-13b": Case("qlora-13b", "13b", "qlora", 4),
    "smoke-lora": Case("smoke-lora", "smoke", "lora", 4),
    "smoke-qlora": Case("smoke-qlora", "smoke", "qlora", 4),
}


def llava_config(shape: Shape) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.heads, vocab_size=shape.vocab, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch, projection_dim=768)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=shape.vocab - 64,
                       image_seq_length=shape.image_tokens, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


# --- FLOPs ---------------------------------------------------------------------------------------

def lm_forward_flops(shape: Shape, n: int) -> float:
    """One sample of n tokens through the LM: linear layers + lm_head + causal attention."""
    per_layer = 4 * shape.hidden * shape.hidden + 3 * shape.hidden * shape.intermediate
    linear = 2 * n * (shape.layers * per_layer + shape.hidden * shape.vocab)
    attention = 2 * shape.layers * n * n * shape.hidden  # QK^T and AV over the causal half
    return linear + attention


def vision_forward_flops(shape: Shape) -> float:
    """One image: the CLIP layers up to the feature layer (-2) and the projector."""
    n, d = shape.image_tokens + 1, shape.vision_hidden
    per_layer = 2 * n * (4 * d * d + 2 * d * shape.vision_intermediate) + 4 * n * n * d
    projector = 2 * shape.image_tokens * (d * shape.hidden + shape.hidden * shape.hidden)
    return (shape.vision_layers - 1) * per_layer + projector


def useful_flops(shape: Shape, samples: list[tuple[int, bool]]) -> float:
    return sum(2 * lm_forward_flops(shape, n) + (vision_forward_flops(shape) if img else 0) for n, img in samples)


# --- samples and batches -------------------------------------------------------------------------

def draw_samples(shape: Shape, count: int, seed: int) -> list[tuple[int, bool]]:
    """(length, has image) pairs of the LLaVA mix, image tokens and text scaled to the shape."""
    lengths, is_image = llava_mix(count, seed)
    out = []
    for n, img in zip(lengths, is_image, strict=True):
        text = n - (576 if img else 0)
        text = max(8, round(text * shape.length_scale))
        out.append((text + (shape.image_tokens if img else 0), img))
    return out


def make_item(shape: Shape, image_token: int, length: int, image: bool, rng: torch.Generator) -> dict[str, Any]:
    text = length - (shape.image_tokens if image else 0)
    ids = torch.randint(3, image_token - 1, (length,), generator=rng)
    ids[0] = 1
    if image:
        ids[1:1 + shape.image_tokens] = image_token
    labels = torch.full((length,), IGNORE)
    supervised = max(1, 2 * text // 3)
    labels[length - supervised:] = ids[length - supervised:]
    item = {"input_ids": ids, "labels": labels}
    if image:
        item["pixel_values"] = torch.randn(3, shape.image_size, shape.image_size, generator=rng)
    return item


def pad_batch(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The plain baseline's collation: right-pad to the longest, attention mask, stacked images."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        ids[r, :n], labels[r, :n], mask[r, :n] = it["input_ids"], it["labels"], 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    images = [it["pixel_values"] for it in items if "pixel_values" in it]
    if images:
        batch["pixel_values"] = torch.stack(images)
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def plain_batches(items: list[dict], samples: list[tuple[int, bool]], batch: int, seed: int) -> list[dict]:
    order = anchor_order([n for n, _ in samples], [img for _, img in samples], batch, 1, seed)
    return [pad_batch([items[i] for i in order[k:k + batch]]) for k in range(0, len(order), batch)]


def packed_batches(items: list[dict], samples: list[tuple[int, bool]], batch: int, pack_length: int,
                   seed: int) -> list[dict]:
    from llava_cluster.train.packing import PackedCollator, PackedRowSampler

    lengths = [n for n, _ in samples]
    rows_per_batch = max(1, round(batch * (sum(lengths) / len(lengths)) / pack_length))
    rows = list(PackedRowSampler(lengths, pack_length, rows_per_batch, 1, seed=seed))
    collate = PackedCollator(pad_token_id=0)
    return [collate([[items[i] for i in row] for row in rows[k:k + rows_per_batch]])
            for k in range(0, len(rows), rows_per_batch)]


# --- models --------------------------------------------------------------------------------------

def run_spec(case: Case, base: str, dtype_name: str) -> Any:
    from llava_cluster.spec import RunSpec

    return RunSpec.model_validate({
        "name": "bench", "storage": tempfile.gettempdir(), "method": case.method,
        "model": {"base": base}, "data": {"train": "unused.json", "max_length": 2048},
        "lora": {"r": 128, "alpha": 256, "dropout": 0.05},
        "training": {"precision": dtype_name, "deepspeed": "zero2", "gradient_checkpointing": True},
    })


def random_model(shape: Shape, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    with device:
        return LlavaForConditionalGeneration._from_config(llava_config(shape), attn_implementation="sdpa",
                                                          dtype=dtype)


def save_random(shape: Shape, folder: Path, dtype: torch.dtype, device: torch.device) -> float:
    start = time.perf_counter()
    model = random_model(shape, device, dtype)
    model.save_pretrained(folder)
    del model
    free_memory()
    return time.perf_counter() - start


def plain_model(case: Case, shape: Shape, base: Path | None, device: torch.device, dtype: torch.dtype) -> Any:
    """transformers + PEFT as the anchor sets it up (no project code)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    if case.method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype,
                                   llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector",
                                                          "lm_head"])
        model = LlavaForConditionalGeneration.from_pretrained(
            base, dtype=dtype, quantization_config=quant, attn_implementation="sdpa",
            device_map={"": device.index or 0} if device.type == "cuda" else None)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = random_model(shape, device, dtype)
    model.config.use_cache = False
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    model = get_peft_model(model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name:
            p.requires_grad_(True)
    return model


def our_model(case: Case, shape: Shape, base: Path | None, device: torch.device, dtype: torch.dtype,
              dtype_name: str) -> Any:
    """The product's setup: build_model for QLoRA (load 4-bit from disk), wrap_for_training for LoRA."""
    from llava_cluster.train.model_setup import build_model, wrap_for_training

    spec = run_spec(case, str(base or "unused"), dtype_name)
    if case.method == "qlora":
        return build_model(spec, local_rank=device.index or 0)
    return wrap_for_training(random_model(shape, device, dtype), spec)


def optimizer(model: Any, ours: bool, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"
    if ours:
        from llava_cluster.train.trainer import param_groups

        decay = {n for n, p in model.named_parameters() if p.ndim >= 2}
        return torch.optim.AdamW(param_groups(model, decay, 0.0, 2e-4, 2e-5), lr=2e-4, fused=fused)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=fused)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- timing --------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(model: Any, opt: torch.optim.Optimizer, batches: list[dict], warmup: int,
                device: torch.device) -> dict[str, Any]:
    """Warm up on the first batches, then time the rest; returns seconds, losses and peak memory."""
    model.train()  # gradient checkpointing only acts in training mode (from_pretrained returns eval mode)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    losses = []

    def step(batch: dict) -> None:
        count = int((batch["labels"][:, 1:] != IGNORE).sum())
        loss = model(**batch, num_items_in_batch=count).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for batch in batches[:warmup]:
        step(batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": seconds, "peak_gib": peak, "losses": [float(x) for x in losses]}


def real_tokens(batches: list[dict]) -> int:
    """Non-pad tokens: attention-mask ones (plain) or non-pad ids (packed rows pad with id 0)."""
    total = 0
    for b in batches:
        total += int(b["attention_mask"].sum()) if "attention_mask" in b else int((b["input_ids"] != 0).sum())
    return total


def batch_samples(batches: list[dict], image_token: int) -> list[tuple[int, bool]]:
    """(length, has image) of every sample in the batches, recovered from positions/masks."""
    out = []
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            ids = b["input_ids"][r]
            if "attention_mask" in b:
                starts = [0]
                ends = [int(b["attention_mask"][r].sum())]
            else:
                pos = b["position_ids"][r]
                starts = [int(i) for i in torch.nonzero(pos == 0).flatten()]
                ends = starts[1:] + [len(pos)]
            for s, e in zip(starts, ends, strict=True):
                if int(ids[s]) == 1:  # a sample starts with bos; padding segments do not
                    out.append((e - s, bool((ids[s:e] == image_token).any())))
    return out


def measure(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    shape = SHAPES[case.shape]
    dtype_name = "bf16" if device.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    image_token = llava_config(shape).image_token_index
    batch = args.batch or case.batch
    steps = args.warmup + args.steps
    samples = draw_samples(shape, batch * steps, args.seed)
    rng = torch.Generator().manual_seed(args.seed)
    items = [make_item(shape, image_token, n, img, rng) for n, img in samples]
    pack_length = args.pack_length if case.shape != "smoke" else 128
    result: dict[str, Any] = {"case": case.name, "shape": case.shape, "method": case.method, "batch": batch,
                              "pack_length": pack_length, "samples": len(samples)}
    base = None
    workdir = Path(tempfile.mkdtemp(prefix="llava-bench-", dir=args.scratch))
    try:
        if case.method == "qlora":
            base = workdir / "model"
            result["save_seconds"] = save_random(shape, base, dtype, device)
        for path in ("plain", "ours"):
            start = time.perf_counter()
            if path == "plain":
                model = plain_model(case, shape, base, device, dtype)
                cpu_batches = plain_batches(items, samples, batch, args.seed)
            else:
                model = our_model(case, shape, base, device, dtype, dtype_name)
                cpu_batches = packed_batches(items, samples, batch, pack_length, args.seed)
            setup = time.perf_counter() - start
            batches = [to_device(b, device, dtype) for b in cpu_batches]
            timed = cpu_batches[args.warmup:]
            run = train_steps(model, optimizer(model, path == "ours", device), batches, args.warmup, device)
            tokens = real_tokens(timed)
            slots = sum(b["input_ids"].numel() for b in timed)
            flops = useful_flops(shape, batch_samples(timed, image_token))
            result[path] = {
                "setup_seconds": setup, "micro_batches": len(timed), "real_tokens": tokens, "token_slots": slots,
                "real_fraction": tokens / slots, "tokens_per_s": tokens / run["seconds"],
                "useful_tflops": flops / run["seconds"] / 1e12,
                "mfu": flops / run["seconds"] / 1e12 / PEAK_TFLOPS if device.type == "cuda" else None,
                "batch_shapes": [list(b["input_ids"].shape) for b in timed],
                **run,
            }
            del model, batches
            free_memory()
        result["ratio_tokens_per_s"] = result["ours"]["tokens_per_s"] / result["plain"]["tokens_per_s"]
        if device.type == "cuda":
            result["ratio_peak"] = result["ours"]["peak_gib"] / result["plain"]["peak_gib"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def environment(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "command": " ".join([Path(sys.executable).name, *sys.argv])}
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    return env


def table(results: list[dict[str, Any]]) -> str:
    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = [f"{'case':<12} {'path':<6} {'micro-batch':>12} {'real%':>6} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
             f"{'peak GiB':>9}"]
    for r in results:
        for path in ("plain", "ours"):
            p = r[path]
            shape = "x".join(map(str, max(p["batch_shapes"], key=lambda s: s[0] * s[1])))
            lines.append(f"{r['case']:<12} {path:<6} {shape:>12} {p['real_fraction']:>6.1%} "
                         f"{p['tokens_per_s']:>9,.0f} {p['useful_tflops']:>8.1f} {fmt(p['mfu'], '.1%'):>6} "
                         f"{fmt(p['peak_gib'], '.1f'):>9}")
        lines.append(f"{r['case']:<12} {'ours/plain':<10} tokens/s {r['ratio_tokens_per_s']:.2f}x"
                     + (f", peak {r['ratio_peak']:.2f}x" if "ratio_peak" in r else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="lora-7b,lora-13b,qlora-7b,qlora-13b",
                        help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (smoke-lora,smoke-qlora)")
    parser.add_argument("--steps", type=int, default=8, help="timed micro-batches per path")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, help="plain samples per micro-batch (default: per case)")
    parser.add_argument("--pack-length", type=int, default=4096, help="tokens per packed row (ours)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", default=None, help="local disk for QLoRA checkpoints (default: temp dir)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="folder for the JSON")
    args = parser.parse_args()
    names = ["smoke-lora", "smoke-qlora"] if args.smoke else args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: the 7B/13B cases need the GPU; use --smoke on a CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(device), "args": vars(args), "results": []}
    for name in names:
        started = time.perf_counter()
        try:
            result = measure(CASES[name], args, device)
        except Exception as err:  # one failing case (e.g. out of memory) must not lose the others' figures
            result = {"case": name, "error": f"{type(err).__name__}: {err}"}
            free_memory()
        result["wall_seconds"] = time.perf_counter() - started
        report["results"].append(result)
        (out / "train_throughput.json").write_text(json.dumps(report, indent=2))
        print(f"{name}: {'error ' + result['error'] if 'error' in result else 'done'} "
              f"in {result['wall_seconds']:.0f} s", flush=True)
    done = [r for r in report["results"] if "error" not in r]
    print(f"\n{report['environment']}\n")
    print(table(done))
    if len(done) < len(names):
        sys.exit(1)


if __name__ == "__main__":
    main()
