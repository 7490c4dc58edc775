"""RunSpec: the one input of a run. Loaded from YAML, overridden with `key=value`, validated with
messages that say what to change, then frozen into the run directory as `spec.yaml`.

Relative paths in a spec are resolved against the directory the command runs from, and frozen as
absolute paths: every node of a cluster must see them at the same place (shared storage).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llava_cluster.errors import UserError

# The language model's projections only: CLIP's vision layers use the same q/k/v names.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Section):
    base: str = Field(description="path to a Hugging Face LLaVA checkpoint (LlavaForConditionalGeneration)")
    template: str = Field("vicuna_v1", description="conversation template")

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        from llava_cluster.data.templates import TEMPLATES

        if value not in TEMPLATES:
            raise ValueError(f"unknown template {value!r}; choose one of {', '.join(TEMPLATES)}")
        return value


class DataSpec(_Section):
    train: str
    eval: str | None = None
    image_folder: str | None = None
    image_aspect_ratio: Literal["pad", "resize"] = "pad"
    max_length: int = Field(2048, ge=16)
    num_workers: int = Field(4, ge=0)


class LoraSpec(_Section):
    r: int = Field(128, ge=1)
    alpha: float = Field(256, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str = DEFAULT_LORA_TARGETS


class OptimSpec(_Section):
    lr: float = Field(2e-4, gt=0)
    projector_lr: float = Field(2e-5, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: run the epochs)")
    per_device_batch: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    seed: int = 42


class TrainingSpec(_Section):
    deepspeed: str = Field("zero3", description="zero2 | zero3 | zero3_offload | path to a DeepSpeed JSON")
    deepspeed_overrides: dict[str, Any] = Field(
        default_factory=dict, description="deep-merged into the DeepSpeed config, e.g. {zero_optimization: {...}}"
    )
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_checkpointing: bool = True
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(3, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    logging_steps: int = Field(1, ge=1)
    device_map: bool | None = Field(
        None, description="QLoRA on GPUs: place each rank's 4-bit model with a device_map (default: yes unless ZeRO-3)"
    )
    packing: bool = Field(
        False, description="pack several samples per row (exact: no cross-sample attention); per_device_batch "
                           "then counts rows of pack_length tokens, not samples"
    )
    pack_length: int | None = Field(None, ge=16, description="tokens per packed row (default: data.max_length)")


class ResourcesSpec(_Section):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1, description="ranks per node (on a CPU-only machine: CPU processes)")
    cpus_per_task: int = Field(8, ge=1)
    mem: str = "0"
    time: str = "24:00:00"
    gpu_type: str = "H100-80GB"


class ContainerSpec(_Section):
    runtime: Literal["none", "pyxis", "apptainer"] = "none"
    image: str | None = None
    mounts: list[str] = Field(default_factory=list, description="extra host:container mounts")

    @model_validator(mode="after")
    def _image_needed(self) -> ContainerSpec:
        if self.runtime != "none" and not self.image:
            raise ValueError(f"container runtime {self.runtime!r} needs slurm.container.image")
        return self


class SlurmSpec(_Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra_sbatch: list[str] = Field(default_factory=list, description="extra #SBATCH options, e.g. --constraint=h100")
    container: ContainerSpec = Field(default_factory=ContainerSpec)
    max_requeues: int = Field(3, ge=0)
    signal_seconds: int = Field(120, ge=10, description="SIGUSR2 this long before the time limit")
    python: str = Field("llava-cluster", description="command that runs llava-cluster on the compute nodes")


class K8sSpec(_Section):
    namespace: str = "default"
    image: str = "ghcr.io/llava-cluster/llava-cluster:0.1.0"
    claim: str = "llava-shared"
    storage_class: str | None = None
    storage_size: str = "500Gi"
    mount_path: str = "/shared"
    shm_size: str = "64Gi"
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    hub_token_secret: str | None = Field(None, description="name of a Secret with key HF_TOKEN")
    service_account: str | None = None


class MergeSpec(_Section):
    into: Literal["base", "dequantized"] = "base"
    verify: bool = True
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field(None, description="merged weights (default: the base's)")


class ValidationSpec(_Section):
    max_samples: int | None = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    compare_base: bool = True


class RunSpec(_Section):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9.-]{0,50}[a-z0-9])?$")
    storage: str = Field(description="shared storage root; the run lives in <storage>/runs/<name>")
    method: Literal["lora", "qlora"] = "lora"
    model: ModelSpec
    data: DataSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    k8s: K8sSpec = Field(default_factory=K8sSpec)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment, e.g. NCCL_* settings")

    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        ds = self.training.deepspeed
        if ds not in DEEPSPEED_PRESETS and not ds.endswith(".json"):
            raise ValueError(
                f"training.deepspeed: {ds!r} is neither a preset ({', '.join(DEEPSPEED_PRESETS)}) nor a .json path"
            )
        if self.method == "qlora":
            if ds.startswith("zero3") and self.training.device_map is True:
                raise ValueError(
                    "QLoRA with training.device_map=true cannot run under ZeRO-3 (DeepSpeed rejects a "
                    "device_map). Set training.deepspeed=zero2 (recommended) or training.device_map=false."
                )
            if self.resources.nodes > 1:
                raise ValueError(
                    f"QLoRA runs on one node (ZeRO-2, each rank holds the 4-bit model); "
                    f"resources.nodes={self.resources.nodes}: set resources.nodes=1 or use method=lora."
                )
        if self.merge.into == "dequantized" and self.method != "qlora":
            raise ValueError("merge.into=dequantized only applies to method=qlora; use merge.into=base")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.storage) / "runs" / self.name

    @property
    def world_size(self) -> int:
        return self.resources.nodes * self.resources.gpus_per_node

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """Short hash of everything that determines the run; recorded next to every artifact."""
        canonical = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]


PATH_FIELDS = ("storage", "model.base", "data.train", "data.eval", "data.image_folder")


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in assignment:
        raise UserError(f"override {assignment!r} is not key=value (e.g. optim.lr=1e-4)")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: the run spec is not valid:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        elif e["type"] == "missing":
            msg = "required, missing"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def spec_from_dict(data: dict[str, Any], source: str = "spec", base_dir: Path | None = None) -> RunSpec:
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_errors(source, err)) from None
    return _absolute_paths(spec, base_dir or Path.cwd())


def _absolute_paths(spec: RunSpec, base: Path) -> RunSpec:
    for dotted in PATH_FIELDS:
        section, _, attr = dotted.rpartition(".")
        owner = getattr(spec, section) if section else spec
        value = getattr(owner, attr)
        if value and "://" not in value:
            setattr(owner, attr, str((base / Path(value).expanduser()).resolve()))
    if spec.training.deepspeed.endswith(".json"):
        spec.training.deepspeed = str((base / spec.training.deepspeed).resolve())
    return spec


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read a YAML spec (or a frozen spec.yaml), apply overrides, validate, absolutise paths."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"run spec not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a run spec is a YAML mapping (name:, storage:, model:, data:, ...)")
    for assignment in overrides:
        apply_override(data, assignment)
    return spec_from_dict(data, source=str(path))


def check_inputs_exist(spec: RunSpec) -> None:
    """Fail before any job starts when an input path is missing."""
    checks = [("model.base", spec.model.base, "dir"), ("data.train", spec.data.train, "file")]
    if spec.data.eval:
        checks.append(("data.eval", spec.data.eval, "file"))
    if spec.data.image_folder:
        checks.append(("data.image_folder", spec.data.image_folder, "dir"))
    if spec.training.deepspeed.endswith(".json"):
        checks.append(("training.deepspeed", spec.training.deepspeed, "file"))
    for key, value, kind in checks:
        p = Path(value)
        ok = p.is_dir() if kind == "dir" else p.is_file()
        if not ok:
            raise UserError(f"{key}: {kind} not found: {value}")
    if not (Path(spec.model.base) / "config.json").is_file():
        raise UserError(f"model.base: {spec.model.base} has no config.json (not a Hugging Face checkpoint)")
