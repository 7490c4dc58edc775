"""The optional lmms-eval block of the validate stage: lmms-eval's tasks (its own, or local task YAMLs)
on the merged model, beside our held-out scores.

lmms-eval runs as a subprocess of an interpreter that may live in an environment of its own (its
pins clash with training's: it pulls a newer torch, a CUDA torchvision and an older protobuf), so its
imports and crashes stay out of this process. Whatever happens to it, the validate stage's own
metrics are kept: a missing package, missing task data or a failed run is a warning and a recorded
`{"status": "skipped"|"failed", "reason": ...}` in metrics.json and the report, never a lost stage
(those scores may have taken hours of GPU time; the extra evaluation is optional).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from llava_cluster.spec.lmms_eval import LmmsEvalSpec

OUT_NAME = "lmms_eval"  # validate/lmms_eval/: results.json, samples_<task>.jsonl, lmms_eval.log
LOG_NAME = "lmms_eval.log"
RESULTS_NAME = "results.json"
ERROR_LINE = re.compile(r"Error during evaluation: (.*?)\.? Please set `--verbosity")
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(\w*(?:Error|Exception)): (.+)$", re.MULTILINE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WRAPPERS = ("RetryError",)  # tenacity's: the error it retried is the one to show


def interpreter(block: LmmsEvalSpec) -> str:
    return block.python or sys.executable


def installed_version(python: str) -> str | None:
    """lmms-eval's version in `python`'s environment, None when it is not installed there (read from
    the package metadata: importing lmms-eval takes tens of seconds)."""
    probe = "import importlib.metadata as m; print(m.version('lmms_eval'))"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def skip_reason(block: LmmsEvalSpec, model_kind: str, model_dir: Path, version: str | None) -> str | None:
    """Why lmms-eval cannot run here, before starting it; None when it can."""
    python = interpreter(block)
    if model_kind != "merged":
        return (f"lmms-eval loads a full checkpoint and {model_dir} is an adapter: run the merge stage "
                "(or `llava-cluster merge`) first")
    if block.include_path and not Path(block.include_path).is_dir():
        return f"validation.lmms_eval.include_path {block.include_path} is not a folder (the local task YAMLs)"
    if block.python and not shutil.which(block.python):
        return f"validation.lmms_eval.python {block.python} not found (a path, or a name on PATH)"
    if version is None:
        return (f"lmms-eval is not installed for {python}: install it (pip install lmms-eval, best in an "
                "environment of its own, its pins clash with training's) and point validation.lmms_eval.python "
                "at that environment's python")
    return None


def eval_argv(block: LmmsEvalSpec, model_dir: Path, out: Path, device: str, dtype: str) -> list[str]:
    """`python -m lmms_eval eval ...` on the merged folder. `--force_simple`: lmms-eval's chat variant
    of llava_hf needs a chat template in the processor, the simple one falls back to LLaVA-1.5's
    Vicuna prompt; device_map is given because transformers 5 refuses lmms-eval's empty default."""
    device_map = "cuda:0" if device == "cuda" else device
    argv = [interpreter(block), "-m", "lmms_eval", "eval", "--model", block.model, "--force_simple",
            "--model_args", f"pretrained={model_dir},device={device},device_map={device_map},dtype={dtype}",
            "--tasks", ",".join(block.tasks), "--batch_size", str(block.batch_size),
            "--output_path", str(out), "--log_samples"]
    if block.limit:
        argv += ["--limit", str(block.limit)]
    if block.include_path:
        argv += ["--include_path", str(Path(block.include_path).resolve())]
    return argv


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """Per task: documents scored and each metric's value with its standard error, from lmms-eval's
    aggregated results JSON (keys "metric,filter" and "metric_stderr,filter"; "N/A" and
    non-numeric entries, e.g. submission files, are left out)."""
    tasks: dict[str, Any] = {}
    for task, row in (results.get("results") or {}).items():
        better = (results.get("higher_is_better") or {}).get(task) or {}
        metrics = {}
        for key, value in row.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or "_stderr_" in name or not _number(value):
                continue
            stderr = row.get(f"{name}_stderr,{filt}")
            metrics[name if filt == "none" else f"{name},{filt}"] = {
                "value": float(value), "stderr": float(stderr) if _number(stderr) else None,
                "higher_is_better": better.get(name)}
        samples = ((results.get("n-samples") or {}).get(task) or {}).get("effective")
        tasks[task] = {"samples": samples, "metrics": metrics}
    return tasks


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def failure_reason(log: Path, returncode: int) -> str:
    """What went wrong, from the log (lmms-eval exits 0 after catching an error): the first exception
    of the traceback (the cause, e.g. "FileNotFoundError: Unable to find 'val.json'"), else its own
    "Error during evaluation" line, else the exit code."""
    text = ANSI.sub("", log.read_text(errors="replace")) if log.is_file() else ""
    causes = [f"{kind}: {message}" for kind, message in EXCEPTION_LINE.findall(text) if kind not in WRAPPERS]
    said = causes[0] if causes else next(iter(ERROR_LINE.findall(text)), None)
    if said:
        return f"{said[:400]} (log: {log})"
    return f"lmms-eval exited with code {returncode} without results (log: {log})"


def _device_and_dtype(model_dir: Path) -> tuple[str, str]:
    """Where the validate stage's own scoring runs (`evaluate.eval_device`), as lmms-eval's names
    ("cuda", "bfloat16"). On a GPU our models are freed first: the subprocess needs the memory."""
    import gc

    import torch

    from llava_cluster.precision import TORCH_NAMES
    from llava_cluster.validate.evaluate import eval_device

    device, precision = eval_device(model_dir)
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    return device, TORCH_NAMES[precision]


def _collect(out: Path) -> Path | None:
    """lmms-eval writes <out>/<model name>/<date>_results.json and _samples_<task>.jsonl: give them
    fixed names in <out> so a reader (and the report) finds them."""
    found = sorted(out.glob(f"*/*_{RESULTS_NAME}"))
    if not found:
        return None
    folder = found[-1].parent
    os.replace(found[-1], out / RESULTS_NAME)
    for samples in folder.glob("*_samples_*.jsonl"):
        os.replace(samples, out / ("samples_" + samples.name.split("_samples_", 1)[1]))
    if not any(folder.iterdir()):
        folder.rmdir()
    return out / RESULTS_NAME


def _read_results(path: Path | None) -> dict[str, Any] | None:
    """The aggregated results, None when absent or unreadable (a run killed while writing it)."""
    try:
        return json.loads(path.read_text()) if path else None
    except (OSError, json.JSONDecodeError):
        return None


def run_lmms_eval(block: LmmsEvalSpec, model_dir: Path, model_kind: str, out_dir: Path) -> dict[str, Any]:
    """Run the block's tasks on the merged `model_dir`; its files go to `out_dir`/lmms_eval/ (replaced
    as a whole, the log kept on failure). Returns the record for metrics.json."""
    from llava_cluster.console import err_console, print_message
    from llava_cluster.rundir import atomic_dir

    python = interpreter(block)
    version = installed_version(python) if model_kind == "merged" else None
    reason = skip_reason(block, model_kind, model_dir, version)
    if reason:
        print_message("lmms-eval skipped", "yellow", reason)
        return {"status": "skipped", "reason": reason, "tasks_requested": block.tasks}
    device, dtype = _device_and_dtype(model_dir)
    final = Path(out_dir) / OUT_NAME
    err_console.print(f"lmms-eval {version}: {', '.join(block.tasks)} on {model_dir} ({device}, {dtype})",
                      highlight=False)
    with atomic_dir(final) as out:
        with open(out / LOG_NAME, "w") as log:
            done = subprocess.run(eval_argv(block, Path(model_dir).resolve(), out, device, dtype), cwd=out,
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        results = _read_results(_collect(out))
        reason = None if results else failure_reason(out / LOG_NAME, done.returncode).replace(str(out), str(final))
    record: dict[str, Any] = {"lmms_eval_version": version, "model": block.model, "tasks_requested": block.tasks,
                              "limit": block.limit, "log": str(final / LOG_NAME)}
    if reason:
        print_message("lmms-eval failed", "yellow", reason)
        return {"status": "failed", "reason": reason, **record}
    tasks = headline(results)
    for line in summary_lines(tasks):
        err_console.print(f"lmms-eval {line}", highlight=False)
    return {"status": "ok", **record, "results": str(final / RESULTS_NAME), "tasks": tasks,
            "seconds": _number_or_none(results.get("total_evaluation_time_seconds"))}


def _number_or_none(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summary_lines(tasks: dict[str, Any]) -> list[str]:
    """`task metric: value ± stderr (n documents)`, one line per task and metric."""
    lines = []
    for task, row in tasks.items():
        for name, m in row["metrics"].items():
            spread = f" ± {m['stderr']:.4g}" if m["stderr"] is not None else ""
            lines.append(f"{task} {name}: {m['value']:.4g}{spread} ({row['samples']} documents)")
    return lines
