"""What produced a set of numbers: code, libraries, device, and the training run behind the model.

A score without the commit, the library versions and the checkpoint's step cannot be reproduced or
compared with next week's. This is recorded next to validation metrics; nothing in it is secret
(the spec's env is refused when it looks like a credential: spec/text.py's looks_secret).
"""

from __future__ import annotations

import json
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "accelerate", "tokenizers")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the llava_cluster checkout this runs from, when it is one (an editable install)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return "cpu"


def environment() -> dict[str, Any]:
    from llava_cluster import __version__

    return {"llava_cluster": __version__, "git_commit": git_commit(), "device": device(),
            "libraries": {name: _version(name) for name in LIBRARIES}, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def training_summary(metrics_log: Path | None) -> dict[str, Any]:
    """Wall time, throughput and final loss from the train stage's metrics log (its last summary row)."""
    if metrics_log is None or not Path(metrics_log).is_file():
        return {}
    summary: dict[str, Any] = {}
    for line in Path(metrics_log).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "train_runtime" in row:
                summary = row
    keys = ("step", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")
    return {k: summary[k] for k in keys if k in summary}
