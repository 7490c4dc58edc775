"""RunSpec: the one input of a run. Loaded from YAML, overridden with `key=value`, validated with
messages that say what to change, then frozen into the run directory as `spec.yaml`.

  base.py       what every section shares (unknown keys refused, assignments validated)
  sections.py   the spec's sections and the rules between them (RunSpec)
  lmms_eval.py  the optional validation.lmms_eval block
  text.py       what a spec's strings may contain: no control characters, SLURM/Kubernetes syntax, no secrets
  deepspeed.py  the DeepSpeed setup a spec resolves to (preset or JSON + overrides): ZeRO stage, offload
  load.py       YAML, overrides, error messages
  paths.py      which fields are paths (made absolute at load), fields by dotted name
  frozen.py     spec.yaml in a run directory (imported from there: it needs the run directory)
"""

from llava_cluster.spec.deepspeed import (
    DEEPSPEED_PRESETS,
    DeepSpeedSetup,
    deepspeed_section_refused,
    deepspeed_setup,
)
from llava_cluster.spec.lmms_eval import LmmsEvalSpec
from llava_cluster.spec.load import apply_override, load_spec, parse_yaml, spec_from_dict
from llava_cluster.spec.paths import PATH_FIELDS, local_paths
from llava_cluster.spec.sections import (
    DEFAULT_LORA_TARGETS,
    ContainerSpec,
    DataSpec,
    K8sSpec,
    LoraSpec,
    MergeSpec,
    ModelSpec,
    OptimSpec,
    ResourcesSpec,
    RunSpec,
    SlurmSpec,
    TrainingSpec,
    ValidationSpec,
)
from llava_cluster.spec.text import SLURM_TIME, looks_secret

__all__ = [
    "DEEPSPEED_PRESETS", "DEFAULT_LORA_TARGETS", "PATH_FIELDS", "SLURM_TIME", "ContainerSpec", "DataSpec",
    "DeepSpeedSetup", "K8sSpec", "LmmsEvalSpec", "LoraSpec", "MergeSpec", "ModelSpec", "OptimSpec", "ResourcesSpec", "RunSpec",
    "SlurmSpec", "TrainingSpec", "ValidationSpec", "apply_override", "deepspeed_section_refused",
    "deepspeed_setup", "load_spec", "local_paths", "looks_secret", "parse_yaml", "spec_from_dict",
]
