"""Merge a LoRA adapter into a base LLaVA checkpoint one tensor at a time.

`merge_and_unload` needs the whole model in RAM (~14 GB for a 7B in bf16, plus PEFT's copies); a
merge job on a CPU node with less memory dies. This path never holds more than one tensor of the
base (and that tensor's LoRA pair) in memory: it reads each shard with `safe_open`, writes each output
shard with a streaming safetensors writer, and keeps the input's sharding, key layout and index.

The arithmetic is PEFT's own (peft 0.21 `lora.Linear.merge` after `PeftModel.from_pretrained`, whose
`autocast_adapter_dtype` holds A and B in fp32): delta = (B_fp32 @ A_fp32) * scaling, then the in-place
`weight += delta` in the weight's dtype. The result is bitwise equal to `merge_and_unload()`.
That add is done as fp32 add + one rounding copy (the same rounding as a mixed-dtype `add_`, about
1.5x faster on CPU), and the next tensor is merged in a worker thread while this one is written.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cluster.errors import UserError
from llava_cluster.model.family import FAMILIES, Family
from llava_cluster.model.load import model_family
from llava_cluster.rundir import atomic_dir

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROJECTOR_WEIGHTS = "non_lora_trainables.safetensors"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                      "BOOL": "bool"}
# Files of a checkpoint folder that are weights (rewritten) rather than config/tokenizer (copied).
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|h5|msgpack)$|.*\.index\.json$")

def memory_name(disk_key: str, family: Family = FAMILIES["llava"]) -> str:
    """The in-memory name (in the family's model class) of a checkpoint key, in either layout."""
    return family.memory_name(disk_key)


def shard_files(base: Path) -> dict[str, list[str]]:
    """Shard file name -> its tensor keys, from the index (or the single `model.safetensors`)."""
    index = base / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        return shards
    if (base / SINGLE_NAME).is_file():
        from safetensors import safe_open

        with safe_open(base / SINGLE_NAME, "pt") as fh:
            return {SINGLE_NAME: list(fh.keys())}
    raise UserError(
        f"{base}: no {SINGLE_NAME} or {INDEX_NAME}; the streaming merge reads safetensors checkpoints only "
        "(convert a pickle checkpoint once with `llava-cluster convert original`)"
    )


def checkpoint_bytes(base: Path) -> int:
    """Bytes of the base checkpoint's weight files (what a full in-memory merge must hold)."""
    return sum((base / name).stat().st_size for name in shard_files(base))


def available_memory_bytes() -> int:
    """Memory this process may still use: MemAvailable, capped by a cgroup limit (containers, SLURM)."""
    avail = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            avail = min(avail, int(limit) - usage)
        break
    return max(avail, 0)


def fits_in_memory(base: Path, dtype: str | None = None, headroom: float = 1.3) -> bool:
    """Would an in-memory `merge_and_unload` of `base` fit? Measured on a 13.2 GiB 7B checkpoint
    (benchmarks/merge_memory.py) it peaked at 14.3 GiB RSS, 1.09x the weights; `headroom` adds margin."""
    size = checkpoint_bytes(base)
    if dtype == "fp32":
        size *= 2  # a bf16/fp16 checkpoint upcast on load; an fp32 one overestimates, which is safe
    return size * headroom <= available_memory_bytes()


@dataclass(frozen=True)
class LoraPair:
    a_key: str
    b_key: str
    scaling: float


def read_tensor(path: Path, key: str):
    """One tensor, with the file opened just for it. safe_open memory-maps the file, and the pages a
    read touched stay in this process's RSS until the file is closed: kept open, a 5 GB shard would
    end up resident in full."""
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        return fh.get_tensor(key)


class Adapter:
    """A PEFT LoRA adapter folder opened lazily: A/B tensors are read only when their weight is merged."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        cfg_path, weights = folder / "adapter_config.json", folder / ADAPTER_WEIGHTS
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
            m = re.fullmatch(r"base_model\.model\.(.+)\.lora_A\.weight", key)
            if m:
                b_key = key.replace(".lora_A.", ".lora_B.")
                self.pairs[m.group(1)] = LoraPair(key, b_key, scaling)
            elif not re.fullmatch(r"base_model\.model\.(.+)\.lora_B\.weight", key):
                raise UserError(
                    f"{weights}: unexpected tensor {key!r}; the streaming merge handles plain LoRA A/B "
                    "weights only (modules_to_save belong in non_lora_trainables.safetensors)"
                )
        self.projector_path = folder / PROJECTOR_WEIGHTS if (folder / PROJECTOR_WEIGHTS).is_file() else None

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
                f"{folder}/adapter_config.json: {', '.join(unsupported) or cfg.get('peft_type')} is not "
                "supported by the streaming merge; merge in memory instead (merge without --streaming)"
            )

    def delta(self, module: str):
        """(B @ A) * scaling in fp32, exactly as PEFT computes it for an fp32-held adapter."""
        pair = self.pairs[module]
        a = read_tensor(self._weights, pair.a_key).float()
        b = read_tensor(self._weights, pair.b_key).float()
        return (b @ a) * pair.scaling


def write_safetensors(path: Path, plan: list[tuple[str, Any, list[int]]], tensors: Iterable[Any]) -> None:
    """Write a safetensors file from a header plan [(key, torch dtype, shape)] and the tensors in the
    same order, one at a time. safetensors' own writer needs every tensor in memory at once."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape in plan:
        n = _nbytes(dtype, shape)
        code = next(c for c, name in SAFETENSORS_DTYPES.items() if getattr(torch, name) == dtype)
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for (key, dtype, shape), tensor in zip(plan, tensors, strict=True):
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise RuntimeError(f"{key}: planned {dtype}{shape}, got {tensor.dtype}{list(tensor.shape)}")
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            fh.write(memoryview(data))
        fh.flush()
        os.fsync(fh.fileno())


def _memory_names_of(base: Path, family: Family) -> set[str]:
    """Parameter and buffer names of the model the base config describes (built on the meta device)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = family.model_cls()._from_config(config)
    return set(model.state_dict().keys())


def streaming_merge(
    base: Path, adapter: Path, out: Path, dtype: str | None = None, progress: bool = True,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Write base + LoRA (+ the trained projector) to `out` as a standard HF checkpoint.

    `dtype` (bf16|fp16|fp32) casts every floating tensor first, like `from_pretrained(dtype=...)`;
    None keeps each tensor's stored dtype. `check(folder)` runs on the finished output before it
    replaces `out`; if it raises, `out` is left as it was. `out` appears atomically, complete or not at all.
    """
    import torch
    from safetensors import safe_open

    base, adapter, out = Path(base), Path(adapter), Path(out)
    if not (base / "config.json").is_file():
        raise UserError(f"{base}: no config.json, not a Hugging Face checkpoint")
    target = getattr(torch, DTYPES[dtype]) if dtype else None
    lora = Adapter(adapter)
    projector_keys: set[str] = set()
    if lora.projector_path:
        with safe_open(lora.projector_path, "pt") as fh:
            projector_keys = set(fh.keys())
    shards = shard_files(base)
    family = model_family(base)
    known = _memory_names_of(base, family)

    disk_of: dict[str, str] = {}
    for keys in shards.values():
        for key in keys:
            name = memory_name(key, family)
            if name not in known:
                raise UserError(f"{base}: tensor {key!r} does not belong to a {family.model_class}")
            disk_of[name] = key
    missing = [m for m in lora.pairs if f"{m}.weight" not in disk_of]
    missing += [k for k in projector_keys if k not in disk_of]
    if missing:
        raise UserError(
            f"{adapter}: {len(missing)} adapter tensor(s) have no weight in {base}, e.g. {missing[0]!r}: "
            "was this adapter trained on another base?"
        )

    def merged(path: Path, key: str):
        t = read_tensor(path, key)
        if target is not None and t.is_floating_point():
            t = t.to(target)
        name = memory_name(key, family)
        if name in projector_keys:
            return read_tensor(lora.projector_path, name).to(t.dtype)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in lora.pairs:
            t.copy_(t.float().add_(lora.delta(module)))
        return t

    show = _progress(progress, len(shards))
    total_bytes = 0
    with atomic_dir(out) as tmp:
        for shard, keys in shards.items():
            with safe_open(base / shard, "pt") as fh:
                plan = []
                for key in keys:
                    piece = fh.get_slice(key)
                    stored = getattr(torch, SAFETENSORS_DTYPES[piece.get_dtype()])
                    dt = target if (target is not None and stored.is_floating_point) else stored
                    plan.append((key, dt, piece.get_shape()))
                    total_bytes += _nbytes(dt, piece.get_shape())
            write_safetensors(tmp / shard, plan, _ahead(merged(base / shard, key) for key in keys))
            show(shard)
        if (base / INDEX_NAME).is_file():
            index = json.loads((base / INDEX_NAME).read_text())
            index["metadata"] = {**index.get("metadata", {}), "total_size": total_bytes}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _copy_side_files(base, tmp, dtype)
        if check is not None:
            check(tmp)


def _ahead(items: Iterable[Any], depth: int = 2) -> Iterable[Any]:
    """Yield `items`, producing up to `depth` of them in a worker thread ahead of the consumer, so
    the merge arithmetic (which releases the GIL) overlaps the file writes."""
    done = object()
    box: queue.Queue = queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for item in items:
                box.put(item)
        except BaseException as err:  # handed to the consumer, raised there
            box.put(err)
        box.put(done)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    while (item := box.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
    worker.join()


def _nbytes(dtype, shape: list[int]) -> int:
    n = dtype.itemsize
    for dim in shape:
        n *= dim
    return n


def _copy_side_files(base: Path, out: Path, dtype: str | None) -> None:
    """Config, tokenizer and processor files travel unchanged, except the config's recorded dtype."""
    for item in base.iterdir():
        if item.is_file() and not WEIGHT_FILE.fullmatch(item.name):
            shutil.copy2(item, out / item.name)
    if dtype:
        cfg = json.loads((out / "config.json").read_text())
        cfg["dtype"] = DTYPES[dtype]
        cfg.pop("torch_dtype", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _progress(enabled: bool, total: int) -> Callable[[str], None]:
    if not enabled:
        return lambda shard: None
    from llava_cluster.console import err_console

    done = [0]

    def show(shard: str) -> None:
        done[0] += 1
        err_console.print(f"merged shard {done[0]}/{total}: {shard}", highlight=False)

    return show
