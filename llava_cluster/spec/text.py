"""What the strings of a spec may contain. Spec values reach batch scripts, manifests and the environment
of every rank: a newline ends an `#SBATCH` comment line (quoting cannot help), so none may hold a
control character, and the SLURM and Kubernetes values must have those systems' own syntax. Secrets
must not be written into a spec at all: it is stored in clear (spec.yaml, the ConfigMap, the sbatch
script, pod env).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationInfo, field_validator

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")  # M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
SLURM_MEM = re.compile(r"\d+[KMGTkmgt]?")
SLURM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
SLURM_NAMES = re.compile(rf"{SLURM_NAME.pattern}(?:,{SLURM_NAME.pattern})*")
SBATCH_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=.*)?")
K8S_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # DNS-1123 label: namespaces
K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # DNS-1123 subdomain: object names
K8S_QUANTITY = re.compile(r"\d+(\.\d+)?([KMGTPE]i|[kMGTPE])?")
NO_SPACES = re.compile(r"\S+")

# A key ending like a secret's name, or a value shaped like a known token.
_SECRET_KEY = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIALS?)$|PASSWORD|SECRET", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"(?<![A-Za-z0-9])(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
                           r"|sk-[\w-]{20,}|AKIA[0-9A-Z]{16}|xox[abprs]-[\w-]{10,})")
_FLAG_VALUES = {"", "0", "1", "true", "false", "yes", "no", "on", "off"}
SECRET_HINT = (
    "a spec is stored in clear (spec.yaml in the run directory, the Kubernetes ConfigMap and pod env, the "
    "sbatch script), so keep secrets out of it: on Kubernetes create a Secret with key HF_TOKEN and name it "
    "in k8s.hub_token_secret; on SLURM (and locally) export it in the shell you submit from, which sbatch "
    "passes to every job, or keep it in a file only you can read (e.g. HF_TOKEN_PATH=~/.cache/huggingface/token)"
)


def looks_secret(key: str, value: str) -> bool:
    """An env entry that holds a credential (by its name, unless a plain flag, or by its value's shape)."""
    named = bool(_SECRET_KEY.search(key)) and value.strip().lower() not in _FLAG_VALUES
    return named or bool(_SECRET_VALUE.search(value))


def control_characters(value: Any, where: str) -> list[str]:
    """`field: message` for every string (keys included) in a raw spec that holds a control character."""
    found: list[str] = []
    if isinstance(value, str):
        match = _CONTROL.search(value)
        if match:
            found.append(f"{where or '(top level)'}: contains the control character {match.group()!r}; "
                         "spec values must be single-line printable text")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            name = str(key)
            if _CONTROL.search(name):
                found.append(f"{where or '(top level)'}: the key {name!r} contains a control character")
                name = repr(name)
            found += control_characters(item, f"{where}.{name}" if where else name)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found += control_characters(item, f"{where}[{i}]")
    return found


def must_match(rules: Mapping[str, tuple[re.Pattern[str], str]]) -> Any:
    """The one validator of a section's text fields that have a syntax: `rules` maps each field to its
    pattern and to what a value must be, which the message names. None passes; a list field has each
    entry checked."""

    def check(cls: type, value: Any, info: ValidationInfo) -> Any:
        pattern, what = rules[info.field_name]
        for item in value if isinstance(value, list) else (value,):
            if item is not None and not pattern.fullmatch(item):
                raise ValueError(f"{item!r} is not {what}")
        return value

    return field_validator(*rules)(check)
