"""Fold a trained adapter and projector into the base: a standard HF checkpoint + processor that
stock `LlavaForConditionalGeneration.from_pretrained` loads.

The base is explicit — from the adapter's metadata, or `--base` — never guessed from folder names.
QLoRA adapters merge into the unquantized base by default (the usual deployment target); with
`--into dequantized` they merge into the 4-bit weights dequantized, which reproduces the model that
was trained exactly, quantization error included. `--verify` compares the merged model's logits with
base + adapter on a probe batch and refuses to write the output above tolerance; a streaming merge
is verified tensor by tensor instead (`verify.py`), so the check never needs both models whole.
The merge record (`llava_cluster_merge.json`) says which check ran.

The output dtype defaults to the base's stored dtype (llava-hf checkpoints are fp16): a merge never
rounds the base's weights to another precision unless asked.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llava_cluster.console import console, err_console
from llava_cluster.errors import UserError
from llava_cluster.precision import PRECISIONS, torch_dtype
from llava_cluster.rundir import RunDir, atomic_dir, atomic_write_json
from llava_cluster.spec import RunSpec

MERGE_INFO = "llava_cluster_merge.json"


@dataclass
class MergeResult:
    out: str
    base: str
    adapter: str
    into: str
    dtype: str
    method: str
    template: str
    streaming: bool
    device: str = "cpu"  # where the in-memory merge and its verification ran
    verification: str = "none"  # "logits" (in memory), "tensors" (streaming) or "none"
    max_abs_diff: float | None = None
    rel_diff: float | None = None


def _merge_device(streaming: bool | None) -> str:
    """The GPU for an in-memory merge when there is one: verifying a 7B on the CPU takes minutes."""
    import torch

    return "cuda" if torch.cuda.is_available() and not streaming else "cpu"


def merge_adapter(adapter: str | Path, out: str | Path, base: str | Path | None = None, into: str = "base",
                  dtype: str | None = None, verify: bool = True, streaming: bool | None = None,
                  overwrite: bool = True) -> MergeResult:
    """Merge `adapter` into its base and write `out`; `overwrite=False` refuses an existing non-empty `out`."""
    from llava_cluster.adapter import check_adapter, read_metadata
    from llava_cluster.merge.safetensors_io import stored_dtype

    adapter = check_adapter(adapter)
    meta = read_metadata(adapter)
    if not overwrite and Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"{out} already exists and is not empty: pick another --out, or pass --overwrite to "
                        "replace it (the new merge replaces it only once it is complete)")
    recorded = not base
    base = str(base or meta.get("base") or "")
    if not base:
        raise UserError(f"{adapter} does not record its base model: pass --base DIR")
    if into == "dequantized" and meta.get("method") not in ("qlora", None):
        raise UserError("--into dequantized is for QLoRA adapters; this one was trained with "
                        f"method={meta.get('method')}")
    if not (Path(base) / "config.json").is_file():
        where = f"the base recorded in {adapter} ({base})" if recorded else f"--base {base}"
        raise UserError(f"{where} is not there (no config.json): pass --base with the base model's folder")
    if dtype is None:
        dtype = stored_dtype(base)
        err_console.print(f"output dtype {dtype}: the base's stored dtype (--dtype or merge.dtype to change)",
                          highlight=False)
    result = MergeResult(out=str(out), base=base, adapter=str(adapter), into=into, dtype=dtype,
                         method=meta.get("method", "lora"), template=meta.get("template", "vicuna_v1"),
                         streaming=False)
    if streaming is None:
        from llava_cluster.merge.memory import fits_in_memory

        streaming = into == "base" and not fits_in_memory(Path(base))
    result.device = _merge_device(streaming)
    if streaming:
        if into != "base":
            raise UserError("--streaming merges into the unquantized base only (drop --into dequantized)")
        from llava_cluster.merge.streaming import streaming_merge

        result.streaming = True

        def record(folder: Path) -> None:
            if verify:
                _verify_streamed(result, folder)
            atomic_write_json(folder / MERGE_INFO, asdict(result))

        streaming_merge(Path(base), adapter, Path(out), dtype=dtype, check=record)
        return result

    _merge_in_memory(result, adapter, verify)
    return result


def _merge_in_memory(result: MergeResult, adapter: Path, verify: bool) -> None:
    """PEFT's `merge_and_unload`; verified by reloading the saved output and comparing probe logits."""
    from llava_cluster.adapter import load_with_adapter
    from llava_cluster.merge.verify import TOLERANCE, probe_inputs, probe_logits
    from llava_cluster.model.load import load_processor, model_family

    base, out, dtype = result.base, result.out, result.dtype
    processor = load_processor(base)
    model = load_with_adapter(base, adapter, torch_dtype(dtype), dequantized=result.into == "dequantized")
    model.eval().to(result.device)
    batch = probe_inputs(processor, result.template) if verify else None
    reference = probe_logits(model, batch) if verify else None
    merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if verify:
            del merged, model  # the reference logits are kept; the models are not needed any more
            reloaded = model_family(base).model_cls().from_pretrained(tmp, dtype=torch_dtype(dtype)).eval()
            reloaded.to(result.device)
            diff = (probe_logits(reloaded, batch) - reference)
            result.verification = "logits"
            result.max_abs_diff = float(diff.abs().max())
            result.rel_diff = float(diff.norm() / reference.norm().clamp_min(1e-12))
            if result.rel_diff > TOLERANCE[dtype]:
                raise UserError(
                    f"merge verification failed: merged logits differ from base + adapter by "
                    f"{result.rel_diff:.2e} (relative; max |Δ| {result.max_abs_diff:.2e}) > {TOLERANCE[dtype]:.0e} "
                    f"for {dtype}; nothing was written to {out}", exit_code=1)
        atomic_write_json(Path(tmp) / MERGE_INFO, asdict(result))


def _verify_streamed(result: MergeResult, folder: Path) -> None:
    """Check the streamed output in `folder` tensor by tensor, before it replaces `result.out`."""
    from llava_cluster.merge.verify import TOLERANCE, verify_streamed

    check = verify_streamed(Path(result.base), Path(result.adapter), folder, TOLERANCE[result.dtype])
    if check.mismatch:
        raise UserError(f"merge verification failed: {check.mismatch} (tolerance {TOLERANCE[result.dtype]:.0e} "
                        f"for {result.dtype}); nothing was written to {result.out}", exit_code=1)
    result.verification = "tensors"
    result.max_abs_diff, result.rel_diff = check.max_abs_diff, check.rel_diff


def read_merge_info(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MERGE_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def _report(result: MergeResult) -> None:
    line = f"merged {result.adapter} into {result.base} ({result.into}, {result.dtype}) -> {result.out}"
    if result.verification == "logits":
        line += f"\nverified: relative logit difference {result.rel_diff:.2e}, max |Δ| {result.max_abs_diff:.2e}"
    elif result.verification == "tensors":
        line += (f"\nverified tensor by tensor: worst relative probe difference {result.rel_diff:.2e}, "
                 f"max |Δ| {result.max_abs_diff:.2e}")
    else:
        line += "\nnot verified (pass --verify to compare against base + adapter)"
    err_console.print(line, highlight=False)


def merge_stage(spec: RunSpec, run: RunDir) -> int:
    adapter = run.final_dir
    if spec.merge.checkpoint == "best":
        from llava_cluster.validate.checkpoints import score_checkpoints

        best = score_checkpoints(spec, run, "all")["best"]
        err_console.print(f"merging the best checkpoint: step {best['step']} (lowest eval loss)", highlight=False)
        adapter = Path(best["path"])
    result = merge_adapter(adapter, run.merged_dir, base=spec.model.base, into=spec.merge.into,
                           dtype=spec.merge.dtype, verify=spec.merge.verify)
    _report(result)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  llava-cluster merge --adapter runs/my-run/train/final --out merged/ --verify\n"
        "  llava-cluster merge --adapter final/ --base llava-1.5-13b-hf/ --out merged/ --dtype bf16\n"
        "  llava-cluster merge --adapter final/ --out merged/ --into dequantized     # QLoRA, exact\n"
        "  llava-cluster merge --adapter final/ --out merged/ --streaming            # shard by shard, low RAM\n"
    )
    parser.add_argument("--adapter", required=True, type=Path, help="train/final or a train/checkpoint-N folder")
    parser.add_argument("--out", required=True, type=Path, help="where the merged checkpoint goes")
    parser.add_argument("--base", type=Path, default=None, help="base model (default: recorded in the adapter)")
    parser.add_argument("--into", choices=("base", "dequantized"), default="base",
                        help="QLoRA: merge into the unquantized base (default) or the dequantized 4-bit weights")
    parser.add_argument("--dtype", choices=PRECISIONS, default=None,
                        help="weights of the output (default: the base's stored dtype)")
    parser.add_argument("--verify", action="store_true", help="compare merged vs base+adapter logits, fail above tolerance")
    parser.add_argument("--streaming", action="store_true", default=None,
                        help="merge one safetensors shard at a time (default: when the model would not fit in RAM)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")

    def handler(args: argparse.Namespace) -> int:
        result = merge_adapter(args.adapter, args.out, base=args.base, into=args.into, dtype=args.dtype,
                               verify=args.verify, streaming=args.streaming, overwrite=args.overwrite)
        if args.json:
            console.print_json(data=asdict(result))
        else:
            _report(result)
        return 0

    parser.set_defaults(func=handler)
