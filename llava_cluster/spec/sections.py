"""The sections of a run spec and the rules between them (`RunSpec` validates a whole spec; loading,
overrides and error messages are in `spec/load.py`)."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from llava_cluster.errors import UserError
from llava_cluster.precision import Precision
from llava_cluster.spec.base import Section
from llava_cluster.spec.deepspeed import DEEPSPEED_PRESETS, deepspeed_section_refused, visible_deepspeed_setup
from llava_cluster.spec.lmms_eval import LmmsEvalSpec
from llava_cluster.spec.paths import PATH_FIELDS, field_value
from llava_cluster.spec.text import (
    ENV_KEY,
    K8S_LABEL,
    K8S_NAME,
    K8S_QUANTITY,
    NO_SPACES,
    SBATCH_OPTION,
    SECRET_HINT,
    SLURM_MEM,
    SLURM_NAME,
    SLURM_NAMES,
    SLURM_TIME,
    control_characters,
    looks_secret,
    must_match,
)

# The language model's projections only: CLIP's vision layers use the same q/k/v names.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class ModelSpec(Section):
    base: str = Field(description="path to a Hugging Face LLaVA checkpoint (llava, llava_next, llava_onevision)")
    template: str | None = Field(
        None, description="conversation template (default: the base's family's, from its config.json: "
                          "vicuna_v1 for LLaVA-1.5, mistral_instruct for v1.6 on Mistral, chatml for OneVision)")

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        from llava_cluster.data.templates import TEMPLATES, unknown_template

        if value is not None and value not in TEMPLATES:
            raise ValueError(unknown_template(value))
        return value

    def chat_template(self) -> str:
        """The template a run trains and validates with: `template`, else the family default of `base`
        (read from its config.json; a v1.6 Mistral base left on Vicuna's would train without error)."""
        from llava_cluster.model.load import template_for

        return template_for(self.base, self.template)


class DataSpec(Section):
    train: str
    eval: str | None = None
    image_folder: str | None = None
    image_aspect_ratio: Literal["pad", "resize"] = "pad"
    max_length: int = Field(2048, ge=16)
    num_workers: int = Field(4, ge=0)


class LoraSpec(Section):
    r: int = Field(128, ge=1)
    alpha: float = Field(256, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str = DEFAULT_LORA_TARGETS

    @field_validator("target_modules")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{value!r} is not a valid regular expression ({err})") from None
        return value


class OptimSpec(Section):
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


class TrainingSpec(Section):
    deepspeed: str = Field("zero3", description="zero2 | zero3 | zero3_offload | path to a DeepSpeed JSON")
    deepspeed_overrides: dict[str, Any] = Field(
        default_factory=dict, description="deep-merged into the DeepSpeed config, e.g. {zero_optimization: {...}}"
    )
    precision: Precision = "bf16"
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
    chunked_loss: bool = Field(
        False, description="compute the loss on supervised positions a chunk at a time (no full logits tensor); "
                           "same loss and gradients, far less memory")

    @field_validator("deepspeed_overrides")
    @classmethod
    def _no_own_sections(cls, value: dict[str, Any]) -> dict[str, Any]:
        why = deepspeed_section_refused(value)
        if why:
            raise ValueError(why)
        return value


class ResourcesSpec(Section):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1, description="ranks per node (on a CPU-only machine: CPU processes)")
    cpus_per_task: int = Field(8, ge=1)
    mem: str = Field("0", description="SLURM --mem per node: 0 (all of it), 64G, 500000M, ...")
    time: str = Field("24:00:00", description="SLURM time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
    gpu_type: str = "H100-80GB"

    @field_validator("mem", "time", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        """`mem: 0` and `time: 90` are YAML integers; SLURM reads them as text."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    _syntax = must_match({
        "mem": (SLURM_MEM, "a SLURM memory size (0 = all of the node, 64G, 500000M, 2T)"),
        "time": (SLURM_TIME, "a SLURM time (e.g. 90, 04:00:00, 2-00:00:00)"),
    })


class ContainerSpec(Section):
    runtime: Literal["none", "pyxis", "apptainer"] = "none"
    image: str | None = None
    mounts: list[str] = Field(default_factory=list, description="extra host:container mounts")

    @field_validator("mounts")
    @classmethod
    def _one_mount_each(cls, value: list[str]) -> list[str]:
        for mount in value:
            if "," in mount or not mount.strip():
                raise ValueError(f"{mount!r}: one mount per entry, host[:container], no commas")
        return value

    @model_validator(mode="after")
    def _image_needed(self) -> ContainerSpec:
        if self.runtime != "none" and not self.image:
            raise ValueError(f"container runtime {self.runtime!r} needs slurm.container.image")
        return self


class SlurmSpec(Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra_sbatch: list[str] = Field(default_factory=list, description="extra #SBATCH options, e.g. --constraint=h100")
    container: ContainerSpec = Field(default_factory=ContainerSpec)
    max_requeues: int = Field(3, ge=0)
    signal_seconds: int = Field(120, ge=10, description="SIGUSR2 this long before the time limit")
    python: str | None = Field(
        None, description="command that runs llava-cluster on the compute nodes (default: the interpreter that "
                          "runs the job's worker, `<python> -m llava_cluster.cli`: the submitting venv's, or the "
                          "container's python3)")

    _syntax = must_match({
        "partition": (SLURM_NAMES, "a SLURM partition name (or a comma-separated list of them)"),
        **dict.fromkeys(("account", "qos"), (SLURM_NAME, "a SLURM name (letters, digits, _ . -)")),
        "extra_sbatch": (SBATCH_OPTION, "a long sbatch option like --constraint=h100 or --exclusive"),
    })

    @field_validator("python")
    @classmethod
    def _splits(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                if not shlex.split(value):
                    raise ValueError("is empty")
            except ValueError as err:
                raise ValueError(f"{value!r} is not a command line ({err})") from None
        return value


class K8sSpec(Section):
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
    api: Literal["trainer-v2", "pytorchjob"] = Field(
        "trainer-v2", description="train stage as a Kubeflow Trainer v2 TrainJob, or a training-operator v1 PyTorchJob")
    queue: str | None = Field(None, description="Kueue LocalQueue: workloads are created suspended, admitted whole")
    priority_class: str | None = Field(None, description="PriorityClass of every pod")
    gang: Literal["volcano", "coscheduling"] | None = Field(
        None, description="gang-schedule the train pods with this scheduler (not needed under Kueue)")
    runtime_ref: str | None = Field(
        None, description="trainer-v2: a ClusterTrainingRuntime the admin installed, instead of our own runtime")

    _syntax = must_match({
        "namespace": (K8S_LABEL, "a Kubernetes namespace (lower-case letters, digits and -)"),
        "queue": (K8S_LABEL, "a Kueue LocalQueue name (lower-case letters, digits and -)"),
        **dict.fromkeys(("claim", "storage_class", "hub_token_secret", "service_account", "priority_class",
                         "runtime_ref"), (K8S_NAME, "a Kubernetes object name (lower-case letters, digits, - and .)")),
        **dict.fromkeys(("storage_size", "shm_size"), (K8S_QUANTITY, "a Kubernetes quantity (e.g. 64Gi, 500Gi, 1Ti)")),
        "image": (NO_SPACES, "a container image reference (no spaces)"),
    })

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} is not an absolute path")
        return value

    @model_validator(mode="after")
    def _runtime_ref_fits(self) -> K8sSpec:
        """An admin's runtime is patched only where Trainer v2 allows (runtimePatches): a pod's
        PriorityClass and scheduler are that runtime's, and a PyTorchJob has no runtime."""
        if self.runtime_ref:
            if self.api != "trainer-v2":
                raise ValueError("runtime_ref names a Kubeflow Trainer v2 ClusterTrainingRuntime: it needs api: trainer-v2")
            for field in ("priority_class", "gang"):
                if getattr(self, field):
                    raise ValueError(f"{field} cannot be set with runtime_ref (Trainer v2 cannot patch it into "
                                     f"a runtime): set it in ClusterTrainingRuntime {self.runtime_ref}")
        return self


class MergeSpec(Section):
    into: Literal["base", "dequantized"] = "base"
    verify: bool = True
    dtype: Precision | None = Field(None, description="merged weights (default: the base's)")
    checkpoint: Literal["final", "best"] = Field(
        "final", description="merge train/final, or the checkpoint with the lowest held-out eval loss")


class ValidationSpec(Section):
    max_samples: int | None = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    compare_base: bool = True
    checkpoints: Literal["final", "last", "all"] = Field(
        "final", description="also score the last, or every, complete checkpoint (base + adapter) on data.eval")
    lmms_eval: LmmsEvalSpec | None = Field(
        None, description="also run these lmms-eval tasks on the merged model (validate/lmms_eval.py)")


class RunSpec(Section):
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

    @model_validator(mode="before")
    @classmethod
    def _printable(cls, data: Any) -> Any:
        problems = control_characters(data, "")
        if problems:
            raise ValueError("\n  ".join(problems))
        return data

    @field_validator("env")
    @classmethod
    def _env_entries(cls, env: dict[str, str]) -> dict[str, str]:
        for key, value in env.items():
            if not ENV_KEY.fullmatch(key):
                raise ValueError(f"{key!r} is not an environment variable name (letters, digits, _; "
                                 "not starting with a digit)")
            if looks_secret(key, value):
                raise ValueError(f"{key} looks like a secret: {SECRET_HINT}")
        return env

    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        ds = self.training.deepspeed
        if ds not in DEEPSPEED_PRESETS and not ds.endswith(".json"):
            raise ValueError(
                f"training.deepspeed: {ds!r} is neither a preset ({', '.join(DEEPSPEED_PRESETS)}) nor a .json path"
            )
        try:
            deepspeed = visible_deepspeed_setup(self.training)
        except UserError as err:
            raise ValueError(err.message) from None
        if self.method == "qlora":
            if deepspeed and not deepspeed.allows_device_map and self.training.device_map is True:
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
        if self.slurm.container.runtime != "none":
            for dotted in PATH_FIELDS:
                value = field_value(self, dotted)
                if value and "," in value:
                    raise ValueError(f"{dotted}: {value!r} holds a comma, which would split the container's "
                                     "mount list; move it to a path without commas")
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

