"""Run specs: defaults, overrides, and one clear message (no traceback) for each bad spec or path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from llava_cluster.cli import main
from llava_cluster.errors import UserError
from llava_cluster.spec import DEFAULT_LORA_TARGETS, load_spec

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, **body) -> Path:
    base = {"name": "r1", "storage": str(tmp_path), "model": {"base": str(tmp_path / "m")},
            "data": {"train": str(tmp_path / "t.json")}}
    base.update(body)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_defaults_are_the_llava_recipe(tmp_path):
    spec = load_spec(write(tmp_path))
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (128, 256, 0.05)
    assert (spec.optim.lr, spec.optim.projector_lr, spec.optim.warmup_ratio) == (2e-4, 2e-5, 0.03)
    assert spec.optim.scheduler == "cosine" and spec.optim.weight_decay == 0
    assert spec.training.deepspeed == "zero3" and spec.lora.target_modules == DEFAULT_LORA_TARGETS
    assert spec.run_dir == tmp_path / "runs" / "r1"


def test_overrides_parse_yaml_values_and_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write(tmp_path), ["optim.lr=1e-4", "resources.nodes=2", "data.train=rel/t.json",
                                       "training.gradient_checkpointing=false"])
    assert spec.optim.lr == 1e-4 and spec.resources.nodes == 2
    assert spec.data.train == str(tmp_path / "rel" / "t.json")
    assert spec.training.gradient_checkpointing is False


@pytest.mark.parametrize("body, overrides, expected", [
    ({}, ["method=qlora", "resources.nodes=2", "training.deepspeed=zero2"], "QLoRA runs on one node"),
    ({}, ["method=qlora", "training.deepspeed=zero3", "training.device_map=true"], "training.deepspeed=zero2"),
    ({}, ["optim.lrr=1"], "optim.lrr: unknown key"),
    ({}, ["model.template=vicuna"], "unknown template 'vicuna'"),
    ({}, ["training.deepspeed=zero4"], "neither a preset"),
    ({}, ["name=Bad_Name"], "name"),
    ({}, ["merge.into=dequantized"], "only applies to method=qlora"),
    ({}, ["optim.lr"], "is not key=value"),
    ({"data": None}, [], "data: required, missing"),
])
def test_bad_specs_name_the_field_and_the_fix(tmp_path, body, overrides, expected):
    path = write(tmp_path, **body)
    if body.get("data", 0) is None:
        text = yaml.safe_load(path.read_text())
        del text["data"]
        path.write_text(yaml.safe_dump(text))
    with pytest.raises(UserError) as err:
        load_spec(path, overrides)
    assert expected in err.value.message


@pytest.mark.parametrize("args, expected", [
    (["submit", "nope.yaml"], "run spec not found: nope.yaml"),
    (["status", "/nonexistent/run"], "not a run directory, a spec file, or the name of a spec"),
    (["merge", "--adapter", "/nonexistent", "--out", "/tmp/x"], "adapter folder not found"),
    (["stage", "train", "--run-dir", "/nonexistent/run"], "has no spec.yaml"),
])
def test_cli_user_errors_exit_2_without_traceback(args, expected):
    proc = subprocess.run([sys.executable, "-m", "llava_cluster.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_submit_dry_run_local_prints_stages_and_writes_nothing(tmp_path, tiny_dir, capsys):
    path = write(tmp_path, model={"base": str(tiny_dir.model)},
                 data={"train": str(tiny_dir.train), "eval": str(tiny_dir.val), "image_folder": str(tiny_dir.images)})
    assert main(["submit", str(path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "train -> merge -> validate" in captured.err  # the header goes to stderr, commands to stdout
    assert "stage train --run-dir" in captured.out
    assert not (tmp_path / "runs").exists()


def test_resubmitting_a_different_spec_under_the_same_name_is_refused(tmp_path, tiny_dir):
    from llava_cluster.rundir import RunDir
    from llava_cluster.submit import freeze

    path = write(tmp_path, model={"base": str(tiny_dir.model)}, data={"train": str(tiny_dir.train)})
    spec = load_spec(path)
    freeze(spec, RunDir(spec.run_dir))
    freeze(spec, RunDir(spec.run_dir))  # the same spec again: fine
    with pytest.raises(UserError, match="different spec .*optim"):
        freeze(load_spec(path, ["optim.lr=1e-3"]), RunDir(spec.run_dir))


def test_stage_spec_freeze_non_rank0_waits_for_rank0(tmp_path, monkeypatch):
    """Pods of a PyTorchJob start together: a worker must wait for rank 0's spec.yaml, not fail."""
    import threading
    import time

    from llava_cluster.rundir import RunDir
    from llava_cluster.stage import freeze_spec

    spec_file = write(tmp_path)
    run = RunDir(tmp_path / "runs" / "r1")
    monkeypatch.setenv("RANK", "1")
    result: list[BaseException | None] = []

    def worker() -> None:
        try:
            freeze_spec(run, spec_file, wait_seconds=30)
            result.append(None)
        except BaseException as err:  # reported below
            result.append(err)

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(1.5)
    assert not result, "the worker gave up before rank 0 wrote the spec"
    run.spec_path.parent.mkdir(parents=True)
    run.spec_path.write_text(load_spec(spec_file).to_yaml())
    thread.join(timeout=10)
    assert result == [None]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="different spec"):
        freeze_spec(run, write(tmp_path, name="r1", method="qlora", training={"deepspeed": "zero2"}))


# ---- what a spec may contain ------------------------------------------------------------------------

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


@pytest.mark.parametrize("backend", ["local", "slurm", "k8s"])
def test_every_backend_refuses_a_hostile_spec_before_rendering_anything(tmp_path, backend, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for dotted in ("resources.mem", "slurm.partition", "storage", "env"):
        path = tmp_path / "hostile.yaml"
        path.write_text(yaml.safe_dump(with_value(tmp_path, dotted, NEWLINE_PAYLOAD)))
        assert main(["submit", str(path), "--backend", backend, "--dry-run"]) == 2
        captured = capsys.readouterr()
        assert dotted in captured.err and "control character" in captured.err and "#SBATCH" not in captured.out
    assert not list(tmp_path.glob("PWNED*"))


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


# ---- secrets ------------------------------------------------------------------------------------------


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


# ---- loading is bounded, every YAML problem a message -------------------------------------------------

BILLION_LAUGHS = """name: r1
storage: {tmp}
model: {{base: {tmp}/m}}
data: {{train: {tmp}/t.json}}
training:
  deepspeed_overrides:
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS.format(tmp=tmp_path))
    with pytest.raises(UserError, match=r"aliases \(\*name\) are not allowed in a run spec"):
        load_spec(path)


def test_deep_nesting_and_huge_files_are_refused(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: r1\ntraining: {deepspeed_overrides: " + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(UserError, match="nested deeper than 32 levels"):
        load_spec(deep)
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: r1\n" + "# padding\n" * 200_000)
    with pytest.raises(UserError, match="too large for a run spec"):
        load_spec(huge)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_spec(binary)


def test_python_tags_and_bad_yaml_in_files_and_overrides_are_messages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text('name: !!python/object/apply:os.system ["touch PWNED-1"]\n')
    with pytest.raises(UserError, match="not valid YAML for a run spec"):
        load_spec(tagged)
    with pytest.raises(UserError, match=r"override 'optim.lr=\[1,': not valid YAML"):
        load_spec(write(tmp_path), ["optim.lr=[1,"])
    with pytest.raises(UserError, match="override .*no !!python or other tags"):
        load_spec(write(tmp_path), ['env=!!python/object/apply:os.system ["touch PWNED-2"]'])
    assert not list(tmp_path.glob("PWNED*"))


def test_cli_prints_the_name_pattern_with_its_brackets(tmp_path, capsys):
    assert main(["submit", str(write(tmp_path, name="Bad_Name")), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "^[a-z0-9]([a-z0-9.-]{0,50}[a-z0-9])?$" in err and "Traceback" not in err


# ---- rules checkable on the login node ----------------------------------------------------------------


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_an_optimizer_or_scheduler_in_deepspeed_overrides_is_refused_at_load(tmp_path, section):
    with pytest.raises(UserError) as err:
        load_spec(write(tmp_path, training={"deepspeed_overrides": {section: {"type": "AdamW"}}}))
    assert f"training.deepspeed_overrides: defines its own '{section}'" in err.value.message


def test_a_user_deepspeed_json_with_its_own_optimizer_is_refused_by_the_same_rule(tmp_path):
    from llava_cluster.train.ds_config import load_deepspeed_config

    ds = tmp_path / "ds.json"
    ds.write_text('{"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}')
    spec = load_spec(write(tmp_path, training={"deepspeed": str(ds)}))
    with pytest.raises(UserError, match=f"training.deepspeed: {ds} defines its own 'optimizer'"):
        load_deepspeed_config(spec)


def test_a_lora_target_regex_that_does_not_compile_is_refused_at_load(tmp_path):
    with pytest.raises(UserError, match=r"lora.target_modules: '\.\*\(q_proj' is not a valid regular expression"):
        load_spec(write(tmp_path, lora={"target_modules": ".*(q_proj"}))
