"""Streaming merge vs PEFT merge_and_unload vs a plain copy, on a LLaVA-1.5-7B-shaped checkpoint.

Writes a random bf16 checkpoint (~14 GB, sharded like llava-hf/llava-1.5-7b-hf, keys in the on-disk
layout transformers uses) and an r=128 adapter (+ projector) under a temp folder, then runs each
contender in its own child process and reports wall time and peak RSS (VmHWM of that child):

    copy       shutil.copytree of the checkpoint: the floor for anything that reads + writes it all
    streaming  llava_cluster.merge.streaming.streaming_merge
    peft       from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
               (skipped when this machine has too little free memory for it)

Goals: streaming peak RSS <= 3 GiB and wall <= 1.5x the copy. Everything generated is deleted at the
end, also on failure or Ctrl-C.

    .venv/bin/python benchmarks/merge_memory.py [--workdir /tmp] [--skip-peft] [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llava_cluster.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTOR_FILE

GIB = 1024**3
SHARD_BYTES = 5 * 10**9
R, ALPHA = 128, 256
TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def llava_7b_config(layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=32001)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=32000, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=32001,
                       tie_word_embeddings=False, dtype="bfloat16")


def disk_name(name: str) -> str:
    """In-memory name -> the llava-hf hub checkpoint's key."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


def generate(base: Path, adapter: Path, layers: int) -> None:
    """Random bf16 weights written tensor by tensor (this process never holds the model)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    from llava_cluster.merge.safetensors_io import write_safetensors

    config = llava_7b_config(layers)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    items = [(disk_name(n), list(t.shape)) for n, t in model.state_dict().items()]
    shards, current, size = [], [], 0
    for key, shape in items:
        n = 2 * int(torch.Size(shape).numel())
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += n
    shards.append(current)
    base.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    # Drawing 7B normal samples takes minutes on 2 cores: each tensor is a window of a random pool at a
    # random offset instead (the merge's cost does not depend on the values).
    pool = (torch.randn(1 << 26, generator=gen) * 0.02).to(torch.bfloat16)

    def random_tensor(shape: list[int]):
        n = int(torch.Size(shape).numel())
        reps = -(-n // pool.numel()) + 1
        start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
        flat = pool.repeat(reps)[start:start + n] if n > pool.numel() // 2 else pool.roll(-start)[:n]
        return flat.clone().reshape(shape)

    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        plan = [(k, torch.bfloat16, s) for k, s in shard]
        tensors = (random_tensor(s) for _, s in shard)
        write_safetensors(base / name, plan, tensors)
        weight_map.update({k: name for k, _ in shard})
        total += (base / name).stat().st_size
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(base)

    adapter.mkdir(parents=True)
    lora = {}
    for name, module in model.named_modules():
        if name.startswith("model.language_model.layers.") and name.rsplit(".", 1)[-1] in (
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            out_f, in_f = module.weight.shape
            lora[f"base_model.model.{name}.lora_A.weight"] = (torch.randn(R, in_f, generator=gen) * 0.01).to(torch.bfloat16)
            lora[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(out_f, R, generator=gen) * 0.01).to(torch.bfloat16)
    save_file(lora, adapter / ADAPTER_WEIGHTS)
    del lora
    projector = {n: (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
                 for n, p in model.named_parameters() if ".multi_modal_projector." in n}
    save_file(projector, adapter / PROJECTOR_FILE)
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": TARGETS, "lora_dropout": 0.05,
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "inference_mode": True}))


def child(kind: str, base: Path, adapter: Path, out: Path) -> None:
    """Runs in its own process: do one contender, print its peak RSS."""
    start = time.perf_counter()
    if kind == "copy":
        shutil.copytree(base, out)
    elif kind == "streaming":
        from llava_cluster.merge.streaming import streaming_merge

        streaming_merge(base, adapter, out, dtype="bf16", progress=False)
    elif kind == "peft":
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.load_state_dict(load_file(adapter / PROJECTOR_FILE), strict=False)
        merged.save_pretrained(out)
    os.sync()
    wall = time.perf_counter() - start
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would inherit the parent's peak.
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"kind": kind, "wall_s": wall, "peak_rss_bytes": hwm}))


def run_child(kind: str, base: Path, adapter: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(base), str(adapter), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"kind": kind, "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1],
                "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spot_check(base: Path, adapter: Path, merged: Path) -> bool:
    """One merged weight recomputed by hand: base + (B @ A) * alpha / r in bf16."""
    import torch
    from safetensors import safe_open

    key = "language_model.model.layers.0.mlp.down_proj.weight"
    lora_key = "base_model.model.model.language_model.layers.0.mlp.down_proj"
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(base / index[key], "pt") as fh:
        w = fh.get_tensor(key)
    with safe_open(adapter / ADAPTER_WEIGHTS, "pt") as fh:
        a, b = fh.get_tensor(f"{lora_key}.lora_A.weight").float(), fh.get_tensor(f"{lora_key}.lora_B.weight").float()
    with safe_open(merged / index[key], "pt") as fh:
        got = fh.get_tensor(key)
    want = w.clone().add_((b @ a) * (ALPHA / R))
    return torch.equal(got, want) and not torch.equal(got, w)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--layers", type=int, default=32, help="LM layers (32 = LLaVA-1.5-7B)")
    parser.add_argument("--skip-peft", action="store_true", help="do not run merge_and_unload")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *paths = args.child
        child(kind, *map(Path, paths))
        return 0

    from llava_cluster.merge.memory import available_memory_bytes, checkpoint_bytes

    root = Path(tempfile.mkdtemp(prefix="merge-memory-", dir=args.workdir))
    results = []
    try:
        base, adapter = root / "base", root / "adapter"
        t0 = time.perf_counter()
        generate(base, adapter, args.layers)
        size = checkpoint_bytes(base)
        print(f"generated {size / GIB:.1f} GiB in {len(list(base.glob('*.safetensors')))} shards + "
              f"{(adapter / ADAPTER_WEIGHTS).stat().st_size / GIB:.2f} GiB adapter "
              f"in {time.perf_counter() - t0:.0f} s under {root}", flush=True)
        for kind in ("copy", "streaming", "peft"):
            if kind == "peft":
                need = size * 1.25 + (adapter / ADAPTER_WEIGHTS).stat().st_size * 2
                if args.skip_peft or available_memory_bytes() < need:
                    results.append({"kind": kind, "error": f"skipped: needs ~{need / GIB:.0f} GiB free, "
                                    f"{available_memory_bytes() / GIB:.0f} GiB available"})
                    continue
            out = root / f"out-{kind}"
            res = run_child(kind, base, adapter, out)
            if kind == "streaming" and "error" not in res:
                res["spot_check"] = spot_check(base, adapter, out)
            results.append(res)
            print(json.dumps(res), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    copy_wall = next((r["wall_s"] for r in results if r["kind"] == "copy" and "wall_s" in r), None)
    print(f"\n{'method':<10} {'wall s':>8} {'peak RSS GiB':>13} {'wall/copy':>10}")
    for r in results:
        if "wall_s" not in r:
            print(f"{r['kind']:<10} {r['error']}")
            continue
        ratio = f"{r['wall_s'] / copy_wall:.2f}" if copy_wall else "-"
        print(f"{r['kind']:<10} {r['wall_s']:>8.1f} {r['peak_rss_bytes'] / GIB:>13.2f} {ratio:>10}")
    print(f"checkpoint {size / GIB:.1f} GiB; goal: streaming peak RSS <= 3 GiB, wall <= 1.5x copy; cpus "
          f"{os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
