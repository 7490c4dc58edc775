"""The product end to end on one GPU, then the throughput benchmark: one prepared device check.

    bash benchmarks/gpu_check.sh                      # device machine (see benchmarks/RESULTS.md), ~8 min
    .venv/bin/python benchmarks/gpu_check.py --smoke  # CPU, tiny shapes: proves the script itself

(a) A random LLaVA-1.5-7B-shaped bf16 base (`llava-cluster tiny --shape 7b`) and the synthetic data;
    then the shipped recipes scaled to a few steps on world 1 (NCCL): LoRA under ZeRO-3 through
    train -> merge --verify -> validate, LoRA under ZeRO-2 (train), QLoRA 4-bit under ZeRO-2 through
    train -> merge --verify. Every stage runs as a user would run it (`llava-cluster submit`).
(b) benchmarks/train_throughput.py, plain transformers + PEFT vs our step (`--throughput` cases).

Everything lands under --out ($OUT): one log per case, the run directories' state, metrics and merge
records, gpu_check.json; a table of every stage (status, seconds, what it measured) is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

CASES = {  # name -> spec changes on top of the common part; the stages each case runs
    "lora-zero3": ({"method": "lora", "training": {"deepspeed": "zero3"}}, "train,merge,validate"),
    "lora-zero2": ({"method": "lora", "training": {"deepspeed": "zero2"}}, "train"),
    "qlora-zero2": ({"method": "qlora", "training": {"deepspeed": "zero2"}}, "train,merge"),
}


def deep_update(node: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for key, value in changes.items():
        if isinstance(value, dict):
            deep_update(node.setdefault(key, {}), value)
        else:
            node[key] = value
    return node


def spec_for(case: str, base: Path, data: Path, storage: Path, smoke: bool) -> dict[str, Any]:
    changes, _ = CASES[case]
    spec = {
        "name": f"gpu-{case}", "storage": str(storage), "method": "lora",
        "model": {"base": str(base), "template": "vicuna_v1"},
        "data": {"train": str(data / "train.json"), "eval": str(data / "val.json"),
                 "image_folder": str(data / "images"), "max_length": 1024, "num_workers": 2},
        "lora": {"r": 4, "alpha": 8} if smoke else {"r": 128, "alpha": 256},
        "optim": {"max_steps": 6, "per_device_batch": 4},
        "training": {"precision": "fp32" if smoke else "bf16", "gradient_checkpointing": True, "save_steps": 3,
                     "logging_steps": 1},
        "resources": {"nodes": 1, "gpus_per_node": 1},
        "merge": {"verify": True},
        "validation": {"max_samples": 8, "batch_size": 8, "max_new_tokens": 8},
    }
    return deep_update(spec, changes)


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, float]:
    start = time.time()
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.time() - start


def stage_rows(case: str, run_dir: Path, stages: str) -> list[dict[str, Any]]:
    rows = []
    for stage in stages.split(","):
        state_file = run_dir / "state" / f"{stage}.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        seconds = (state.get("finished_at") or 0) - (state.get("started_at") or 0)
        note = (state.get("error") or "")[:120]
        if stage == "merge" and (run_dir / "merged" / "llava_cluster_merge.json").is_file():
            info = json.loads((run_dir / "merged" / "llava_cluster_merge.json").read_text())
            rel = info.get('rel_diff')
            note = f"{info.get('verification')} rel {rel:.2e} on {info.get('device')}" if rel is not None else "not verified"
        if stage == "validate" and (run_dir / "validate" / "metrics.json").is_file():
            metrics = json.loads((run_dir / "validate" / "metrics.json").read_text())
            note = f"EM {metrics['finetuned']['exact_match']:.0%}, eval loss {metrics['finetuned']['eval_loss']:.3f}"
        if stage == "train" and (run_dir / "logs" / "train_metrics.jsonl").is_file():
            losses = [json.loads(line).get("loss") for line in (run_dir / "logs" / "train_metrics.jsonl").open()]
            losses = [x for x in losses if x is not None]
            note = note or (f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no loss logged")
        rows.append({"case": case, "stage": stage, "status": state.get("status", "not run"),
                     "seconds": round(max(seconds, 0), 1), "note": note})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/gpu-check"), help="local disk for the base")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--throughput", default="lora-7b", help="train_throughput.py cases ('' to skip)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in fp32 on the CPU")
    parser.add_argument("--case-timeout", type=int, default=240)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    python = [sys.executable, "-m", "llava_cluster.cli"]
    rows: list[dict[str, Any]] = []

    build = ["tiny", "--out", str(args.scratch / "base"), "--samples", "96"]
    if not args.smoke:
        build += ["--shape", "7b", "--device", "cuda", "--dtype", "bf16"]
    code, seconds = run([*python, *build], args.out / "build.log", 600)
    rows.append({"case": "base", "stage": "build", "status": "ok" if code == 0 else f"exit {code}",
                 "seconds": round(seconds, 1), "note": "smoke (tiny)" if args.smoke else "7b bf16 random"})
    if code == 0:
        for case in [c for c in args.cases.split(",") if c]:
            spec = spec_for(case, args.scratch / "base" / "model", args.scratch / "base" / "data",
                            args.scratch / "storage", args.smoke)
            spec_file = args.out / f"{case}.yaml"
            spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
            _, stages = CASES[case]
            command = [*python, "submit", str(spec_file), "--backend", "local"]
            if stages == "train":
                command = [*python, "train", str(spec_file)]
            code, seconds = run(command, args.out / f"{case}.log", args.case_timeout)
            run_dir = args.scratch / "storage" / "runs" / spec["name"]
            rows += stage_rows(case, run_dir, stages)
            rows.append({"case": case, "stage": "(all)", "status": f"exit {code}", "seconds": round(seconds, 1),
                         "note": f"log {args.out / (case + '.log')}"})
    if args.throughput and not args.smoke:
        code, seconds = run([sys.executable, "benchmarks/train_throughput.py", "--cases", args.throughput, "--steps",
                             "6", "--warmup", "2", "--scratch", str(args.scratch), "--out", str(args.out)],
                            args.out / "throughput.log", 420)
        rows.append({"case": "throughput", "stage": args.throughput, "status": f"exit {code}",
                     "seconds": round(seconds, 1), "note": "table in throughput.log"})
    (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=2) + "\n")
    if (args.out / "throughput.log").is_file():
        print((args.out / "throughput.log").read_text()[-3000:])
    print(f"{'case':<13}{'stage':<10}{'status':<11}{'seconds':>8}  note")
    for row in rows:
        print(f"{row['case']:<13}{row['stage']:<10}{row['status']:<11}{row['seconds']:>8}  {row['note']}")


if __name__ == "__main__":
    main()
