"""What a spec's strings may contain (spec/text.py): no control characters anywhere, SLURM and Kubernetes
values in their own syntax, no secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from test_spec_load import write

from llava_cluster.errors import UserError
from llava_cluster.spec import load_spec

NEWLINE_PAYLOAD = "ok\ntouch PWNED #"  # a newline would end an #SBATCH line: the rest runs as a command


def string_fields(model=None, prefix: str = "") -> list[str]:
    """Every field of the spec that holds text, found from the model itself (new fields are covered)."""
    from llava_cluster.spec import RunSpec

    model = model or RunSpec
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        dotted = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += string_fields(annotation, f"{dotted}.")
        elif "str" in str(annotation) or "Literal" in str(annotation) or "Any" in str(annotation):
            found.append(dotted)
    return found


def with_value(tmp_path: Path, dotted: str, value) -> dict:
    from llava_cluster.spec import RunSpec

    data = yaml.safe_load(write(tmp_path).read_text())
    *sections, key = dotted.split(".")
    node, model = data, RunSpec
    for section in sections:
        node = node.setdefault(section, {})
        model = model.model_fields[section].annotation
    text = str(model.model_fields[key].annotation)
    if text.startswith("dict"):
        node[key] = {"K": value} if dotted != "env" else {"A": value}
    elif text.startswith("list"):
        node[key] = [{"key": value}] if "dict" in text else [value]
    else:
        node[key] = value
    return data


def test_every_string_field_is_covered():
    fields = string_fields()
    assert {"storage", "env", "resources.mem", "slurm.partition", "slurm.account", "slurm.qos", "slurm.extra_sbatch",
            "slurm.python", "slurm.container.image", "slurm.container.mounts", "k8s.namespace",
            "training.deepspeed_overrides", "k8s.tolerations", "k8s.node_selector", "model.base"} <= set(fields)


@pytest.mark.parametrize("dotted", string_fields())
def test_a_control_character_in_any_string_field_is_refused_naming_it(tmp_path, dotted):
    from llava_cluster.spec import spec_from_dict

    with pytest.raises(UserError) as err:
        spec_from_dict(with_value(tmp_path, dotted, NEWLINE_PAYLOAD))
    assert dotted in err.value.message and "control character" in err.value.message


def test_a_control_character_in_a_key_is_refused(tmp_path):
    from llava_cluster.spec import spec_from_dict

    data = yaml.safe_load(write(tmp_path).read_text())
    data["k8s"] = {"node_selector": {"zone\nx": "a"}}
    with pytest.raises(UserError, match=r"k8s.node_selector: the key 'zone\\nx' contains a control character"):
        spec_from_dict(data)


@pytest.mark.parametrize("dotted, value, expected", [
    ("env", {"A;touch PWNED": "1"}, "'A;touch PWNED' is not an environment variable name"),
    ("env", {"1A": "1"}, "'1A' is not an environment variable name"),
    ("env", {"A B": "1"}, "is not an environment variable name"),
    ("resources.mem", "64G;touch PWNED", "is not a SLURM memory size"),
    ("resources.mem", "$(touch PWNED)", "is not a SLURM memory size"),
    ("resources.mem", "lots", "is not a SLURM memory size"),
    ("resources.time", "`touch PWNED`", "is not a SLURM time"),
    ("slurm.partition", "gpu;touch PWNED", "is not a SLURM partition name"),
    ("slurm.partition", "gpu debug", "is not a SLURM partition name"),
    ("slurm.account", "$(touch PWNED)", "is not a SLURM name"),
    ("slurm.qos", "`id`", "is not a SLURM name"),
    ("slurm.extra_sbatch", ["-C h100"], "'-C h100' is not a long sbatch option"),
    ("slurm.extra_sbatch", ["--x;touch PWNED=1"], "is not a long sbatch option"),
    ("slurm.python", "llava-cluster 'unclosed", "is not a command line"),
    ("slurm.container.mounts", ["/a,/etc:/etc"], "no commas"),
    ("k8s.namespace", "ns;x", "is not a Kubernetes namespace"),
    ("k8s.claim", "My Claim", "is not a Kubernetes object name"),
    ("k8s.hub_token_secret", "$(x)", "is not a Kubernetes object name"),
    ("k8s.shm_size", "64 GB", "is not a Kubernetes quantity"),
    ("k8s.mount_path", "shared", "is not an absolute path"),
    ("k8s.image", "img:1 --privileged", "no spaces"),
])
def test_values_that_are_not_valid_for_their_field_are_refused(tmp_path, dotted, value, expected):
    from llava_cluster.spec import spec_from_dict

    data = yaml.safe_load(write(tmp_path).read_text())
    *sections, key = dotted.split(".")
    node = data
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = value
    with pytest.raises(UserError) as err:
        spec_from_dict(data)
    assert f"{dotted}: " in err.value.message and expected in err.value.message


@pytest.mark.parametrize("mem", ["0", "64G", "500000M", "2T", "1024"])
def test_slurm_memory_sizes_are_accepted(tmp_path, mem):
    assert load_spec(write(tmp_path), [f"resources.mem={mem}"]).resources.mem == mem


def test_paths_with_spaces_and_quotes_and_metacharacter_env_values_are_legal(tmp_path):
    from llava_cluster.spec import spec_from_dict

    data = yaml.safe_load(write(tmp_path).read_text())
    data["storage"] = str(tmp_path / "it's a \"store\" $(x)")
    data["env"] = {"NCCL_DEBUG": "$(touch PWNED); `x` 'y'"}
    spec = spec_from_dict(data)
    assert spec.storage == data["storage"] and spec.env == data["env"]


@pytest.mark.parametrize("key, value", [
    ("HF_TOKEN", "abc"), ("HUGGING_FACE_HUB_TOKEN", "abc"), ("WANDB_API_KEY", "0123456789abcdef"),
    ("AWS_SECRET_ACCESS_KEY", "x"), ("DB_PASSWORD", "x"), ("MY_SECRET_THING", "x"),
    ("SOME_VAR", "hf_" + "a1B2" * 9), ("GITHUB", "ghp_" + "x" * 36), ("OPENAI", "sk-" + "y" * 40),
])
def test_secret_looking_env_entries_are_refused_with_each_backends_way(tmp_path, key, value):
    with pytest.raises(UserError) as err:
        load_spec(write(tmp_path, env={key: value}))
    message = err.value.message
    assert f"env: {key} looks like a secret" in message
    assert "k8s.hub_token_secret" in message and "sbatch passes to every job" in message
    assert value not in message or len(value) < 4  # the secret itself is not echoed


@pytest.mark.parametrize("key, value", [
    ("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("HF_TOKEN_PATH", "/home/u/tok"),
    ("NCCL_SOCKET_IFNAME", "ib0"), ("HF_HUB_OFFLINE", "1"), ("RUN_TAG", "task-abcdefghijklmnopqrstuvwxyz0123"),
])
def test_ordinary_env_entries_pass(tmp_path, key, value):
    assert load_spec(write(tmp_path, env={key: value})).env == {key: value}
