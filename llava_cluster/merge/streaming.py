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
import queue
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from llava_cluster.adapter import LazyAdapter
from llava_cluster.errors import UserError
from llava_cluster.merge.safetensors_io import (
    INDEX_NAME,
    SAFETENSORS_DTYPES,
    nbytes,
    read_tensor,
    shard_files,
    write_safetensors,
)
from llava_cluster.model.family import Family
from llava_cluster.model.load import model_family
from llava_cluster.precision import TORCH_NAMES, torch_dtype
from llava_cluster.rundir import atomic_dir

# Files of a checkpoint folder that are weights (rewritten) rather than config/tokenizer (copied).
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|h5|msgpack)$|.*\.index\.json$")


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
    target = torch_dtype(dtype) if dtype else None
    lora = LazyAdapter(adapter)
    projector_keys = lora.projector_keys()
    shards = shard_files(base)
    family = model_family(base)
    known = _memory_names_of(base, family)

    disk_of: dict[str, str] = {}
    for keys in shards.values():
        for key in keys:
            name = family.memory_name(key)
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
        name = family.memory_name(key)
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
                    total_bytes += nbytes(dt, piece.get_shape())
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


def _copy_side_files(base: Path, out: Path, dtype: str | None) -> None:
    """Config, tokenizer and processor files travel unchanged, except the config's recorded dtype."""
    for item in base.iterdir():
        if item.is_file() and not WEIGHT_FILE.fullmatch(item.name):
            shutil.copy2(item, out / item.name)
    if dtype:
        cfg = json.loads((out / "config.json").read_text())
        cfg["dtype"] = TORCH_NAMES[dtype]
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
