"""Loading a run spec (spec/load.py): overrides, relative paths, one message per problem, and YAML that
is bounded (no aliases, no deep nesting, no huge files, no tags)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llava_cluster.errors import UserError
from llava_cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, **body) -> Path:
    base = {"name": "r1", "storage": str(tmp_path), "model": {"base": str(tmp_path / "m")},
            "data": {"train": str(tmp_path / "t.json")}}
    base.update(body)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_overrides_parse_yaml_values_and_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write(tmp_path), ["optim.lr=1e-4", "resources.nodes=2", "data.train=rel/t.json",
                                       "training.gradient_checkpointing=false"])
    assert spec.optim.lr == 1e-4 and spec.resources.nodes == 2
    assert spec.data.train == str(tmp_path / "rel" / "t.json")
    assert spec.training.gradient_checkpointing is False


@pytest.mark.parametrize("body, overrides, expected", [
    ({}, ["optim.lrr=1"], "optim.lrr: unknown key; did you mean 'optim.lr'?"),
    ({"validation": {"lmms_eval": {"tasks": ["mme"], "limt": 5}}}, [],
     "validation.lmms_eval.limt: unknown key; did you mean 'validation.lmms_eval.limit'?"),
    ({}, ["validation.lmms_eval.tasks=[mme]", "validation.lmms_eval.include_paths=t"],
     "validation.lmms_eval.include_paths: unknown key; did you mean 'validation.lmms_eval.include_path'? "
     "[from the command line: validation.lmms_eval.include_paths=t]"),
    ({}, ["optim.lr"], "is not key=value"),
    ({"data": None}, [], "data: required, missing"),
])
def test_unknown_missing_and_malformed_keys_name_the_field(tmp_path, body, overrides, expected):
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
