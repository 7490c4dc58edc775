"""RunSpec: the one input of a run. Loaded from YAML, overridden with `key=value`, validated with
messages that say what to change, then frozen into the run directory as `spec.yaml`.

Relative paths in a spec are resolved against the directory the command runs from, and frozen as
absolute paths: every node of a cluster must see them at the same place (shared storage).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from yaml.composer import ComposerError

from llava_cluster.errors import UserError

# The language model's projections only: CLIP's vision layers use the same q/k/v names.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")

# What strings of a spec may contain. Spec values reach batch scripts, manifests and the environment
# of every rank: a newline ends an `#SBATCH` comment line (quoting cannot help), so none may hold a
# control character, and the SLURM values must have SLURM's own syntax.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")  # M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_SLURM_MEM = re.compile(r"\d+[KMGTkmgt]?")
_SLURM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SBATCH_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=.*)?")
_K8S_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # DNS-1123 label: namespaces
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # DNS-1123 subdomain: object names
_K8S_QUANTITY = re.compile(r"\d+(\.\d+)?([KMGTPE]i|[kMGTPE])?")

# Secrets must not be written into a spec: it is stored in clear (spec.yaml, the ConfigMap, the sbatch
# script, pod env). A key ending like a secret's name, or a value shaped like a known token.
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

# DeepSpeed config sections we build ourselves from the spec: the one rule for overrides and user JSON.
DEEPSPEED_OWN_SECTIONS = ("optimizer", "scheduler")

MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_DEPTH = 32


def deepspeed_section_refused(config: Mapping[str, Any]) -> str | None:
    """Why a DeepSpeed config (preset + user JSON + overrides) cannot be used, or None. An optimizer or
    scheduler section of its own would silently replace the projector learning rate and our schedule."""
    for section in DEEPSPEED_OWN_SECTIONS:
        if section in config:
            return (f"defines its own '{section}', which would silently replace the projector learning rate and "
                    "the optim.scheduler schedule; remove that section (llava-cluster builds both from the "
                    "spec's optim: settings)")
    return None


def looks_secret(key: str, value: str) -> bool:
    """An env entry that holds a credential (by its name, unless a plain flag, or by its value's shape)."""
    named = bool(_SECRET_KEY.search(key)) and value.strip().lower() not in _FLAG_VALUES
    return named or bool(_SECRET_VALUE.search(value))


def _control_characters(value: Any, where: str) -> list[str]:
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
            found += _control_characters(item, f"{where}.{name}" if where else name)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found += _control_characters(item, f"{where}[{i}]")
    return found


def _must_match(pattern: re.Pattern[str], value: str | None, what: str) -> str | None:
    if value is not None and not pattern.fullmatch(value):
        raise ValueError(f"{value!r} is not {what}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Section):
    base: str = Field(description="path to a Hugging Face LLaVA checkpoint (LlavaForConditionalGeneration)")
    template: str = Field("vicuna_v1", description="conversation template")

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        from llava_cluster.data.templates import TEMPLATES, unknown_template

        if value not in TEMPLATES:
            raise ValueError(unknown_template(value))
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

    @field_validator("target_modules")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{value!r} is not a valid regular expression ({err})") from None
        return value


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


class ResourcesSpec(_Section):
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

    @field_validator("mem")
    @classmethod
    def _slurm_mem(cls, value: str) -> str:
        return _must_match(_SLURM_MEM, value, "a SLURM memory size (0 = all of the node, 64G, 500000M, 2T)")

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        return _must_match(SLURM_TIME, value, "a SLURM time (e.g. 90, 04:00:00, 2-00:00:00)")


class ContainerSpec(_Section):
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


class SlurmSpec(_Section):
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

    @field_validator("partition")
    @classmethod
    def _partitions(cls, value: str | None) -> str | None:
        if value is not None and not all(_SLURM_NAME.fullmatch(p) for p in value.split(",")):
            raise ValueError(f"{value!r} is not a SLURM partition name (or a comma-separated list of them)")
        return value

    @field_validator("account", "qos")
    @classmethod
    def _slurm_name(cls, value: str | None) -> str | None:
        return _must_match(_SLURM_NAME, value, "a SLURM name (letters, digits, _ . -)")

    @field_validator("extra_sbatch")
    @classmethod
    def _long_options(cls, value: list[str]) -> list[str]:
        for option in value:
            _must_match(_SBATCH_OPTION, option, "a long sbatch option like --constraint=h100 or --exclusive")
        return value

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
    api: Literal["trainer-v2", "pytorchjob"] = Field(
        "trainer-v2", description="train stage as a Kubeflow Trainer v2 TrainJob, or a training-operator v1 PyTorchJob")
    queue: str | None = Field(None, description="Kueue LocalQueue: workloads are created suspended, admitted whole")
    priority_class: str | None = Field(None, description="PriorityClass of every pod")
    gang: Literal["volcano", "coscheduling"] | None = Field(
        None, description="gang-schedule the train pods with this scheduler (not needed under Kueue)")
    runtime_ref: str | None = Field(
        None, description="trainer-v2: a ClusterTrainingRuntime the admin installed, instead of our own runtime")

    @field_validator("namespace")
    @classmethod
    def _label(cls, value: str) -> str:
        return _must_match(_K8S_LABEL, value, "a Kubernetes namespace (lower-case letters, digits and -)")

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str | None) -> str | None:
        return _must_match(_K8S_LABEL, value, "a Kueue LocalQueue name (lower-case letters, digits and -)")

    @field_validator("claim", "storage_class", "hub_token_secret", "service_account", "priority_class", "runtime_ref")
    @classmethod
    def _object_name(cls, value: str | None) -> str | None:
        return _must_match(_K8S_NAME, value, "a Kubernetes object name (lower-case letters, digits, - and .)")

    @field_validator("storage_size", "shm_size")
    @classmethod
    def _quantity(cls, value: str) -> str:
        return _must_match(_K8S_QUANTITY, value, "a Kubernetes quantity (e.g. 64Gi, 500Gi, 1Ti)")

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        return _must_match(re.compile(r"\S+"), value, "a container image reference (no spaces)")

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


class MergeSpec(_Section):
    into: Literal["base", "dequantized"] = "base"
    verify: bool = True
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field(None, description="merged weights (default: the base's)")
    checkpoint: Literal["final", "best"] = Field(
        "final", description="merge train/final, or the checkpoint with the lowest held-out eval loss")


class ValidationSpec(_Section):
    max_samples: int | None = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    compare_base: bool = True
    checkpoints: Literal["final", "last", "all"] = Field(
        "final", description="also score the last, or every, complete checkpoint (base + adapter) on data.eval")


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

    @model_validator(mode="before")
    @classmethod
    def _printable(cls, data: Any) -> Any:
        problems = _control_characters(data, "")
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
        if self.slurm.container.runtime != "none":
            for dotted in PATH_FIELDS:
                value = self._dotted(dotted)
                if value and "," in value:
                    raise ValueError(f"{dotted}: {value!r} holds a comma, which would split the container's "
                                     "mount list; move it to a path without commas")
        return self

    def _dotted(self, dotted: str) -> Any:
        section, _, attr = dotted.rpartition(".")
        return getattr(getattr(self, section) if section else self, attr)

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
    node[parts[-1]] = parse_yaml(raw, f"override {assignment!r}") if raw.strip() else None


class _SpecLoader(yaml.SafeLoader):
    """safe_load without aliases (a billion-laughs block expands exponentially when the spec is
    validated, dumped and hashed) and with a bounded nesting depth (the composer recurses)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise ComposerError(None, None, "YAML aliases (*name) are not allowed in a run spec; write the "
                                "values out", self.peek_event().start_mark)
        depth = self._depth + 1
        if depth > MAX_SPEC_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_SPEC_DEPTH} levels",
                                self.peek_event().start_mark)
        self._depth = depth
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth - 1


def parse_yaml(text: str, source: str) -> Any:
    """YAML of a spec or an override value: plain data only, bounded; every failure a UserError."""
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML for a run spec (plain mappings, lists and scalars; no "
                        f"!!python or other tags): {err}") from None


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys a spec section accepts, for a did-you-mean on an unknown one."""
    model: Any = RunSpec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _format_errors(source: str, err: ValidationError, overrides: dict[str, str]) -> str:
    """One line per problem: where, what, the value given, and whether it came from the command line."""
    import difflib

    lines = [f"{source}: the run spec is not valid:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _keys_at(e["loc"][:-1]), n=1)
            msg = f"unknown key; did you mean {'.'.join([*map(str, e['loc'][:-1]), close[0]])!r}?" if close \
                else "unknown key (typo?)"
        elif e["type"] == "missing":
            msg = "required, missing"
        elif not isinstance(e.get("input"), dict | list):
            msg += f" (got {str(e['input'])[:60]!r})"
        if where in overrides:
            msg += f" [from the command line: {overrides[where]}]"
        lines.append(f"  {where}: {msg}" if e["loc"] else f"  {msg}")
    return "\n".join(lines)


def spec_from_dict(data: dict[str, Any], source: str = "spec", base_dir: Path | None = None,
                   overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as err:
        given = {a.split("=", 1)[0].strip(): a for a in overrides}
        raise UserError(_format_errors(source, err, given)) from None
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
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise UserError(f"{path}: {size} bytes is too large for a run spec (at most {MAX_SPEC_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise UserError(f"{path}: a run spec is a YAML mapping (name:, storage:, model:, data:, ...)")
    for assignment in overrides:
        apply_override(data, assignment)
    return spec_from_dict(data, source=str(path), overrides=overrides)
