"""Preflight: what the submitting machine can check is checked before a job is queued, and by the
train stage before it starts its ranks. Each refusal names the field and the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llava_cluster.cli import main
from llava_cluster.errors import UserError
from llava_cluster.preflight import preflight, problems
from llava_cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


def write_spec(tmp: Path, tiny, **sections) -> Path:
    spec = {"name": "pre", "storage": str(tmp / "storage"),
            "model": {"base": str(tiny.model)},
            "data": {"train": str(tiny.train), "eval": str(tiny.val), "image_folder": str(tiny.images)},
            "resources": {"gpus_per_node": 1}}
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def model_copy(tmp: Path, tiny, **config_changes) -> Path:
    folder = tmp / "base"
    shutil.copytree(tiny.model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_good_spec_passes(tmp_path, tiny_dir):
    assert problems(load_spec(write_spec(tmp_path, tiny_dir))) == []


def test_missing_inputs_are_named_all_at_once(tmp_path, tiny_dir):
    path = write_spec(tmp_path, tiny_dir, model={"base": str(tmp_path / "no-model")},
                      data={"train": str(tmp_path / "no.json"), "image_folder": str(tmp_path / "no-images")})
    found = problems(load_spec(path))
    assert [p.split(":")[0] for p in found] == ["model.base", "data.image_folder", "data.train"], found
    assert "does not exist" in found[0] and "not found" in found[1] and "not found" in found[2]


def test_llava_next_base_is_accepted_by_submit_dry_run_and_plan(tmp_path, tiny_dir, tiny_next_dir, capsys):
    path = write_spec(tmp_path, tiny_dir, model={"base": str(tiny_next_dir.model), "template": "mistral_instruct"})
    assert problems(load_spec(path)) == []
    assert main(["submit", str(path), "--dry-run"]) == 0
    assert main(["plan", str(path)]) == 0


def test_an_unsupported_llava_family_is_refused_with_the_exact_list(tmp_path, tiny_dir, capsys):
    base = model_copy(tmp_path, tiny_dir, model_type="llava_next_video",
                      architectures=["LlavaNextVideoForConditionalGeneration"])
    path = write_spec(tmp_path, tiny_dir, model={"base": str(base)})
    assert main(["submit", str(path), "--dry-run"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert ("'llava_next_video' model, not a LLaVA one llava-cluster fine-tunes: supported are "
            "LlavaForConditionalGeneration (model_type 'llava'), LlavaNextForConditionalGeneration "
            "(model_type 'llava_next')") in err
    assert main(["submit", str(path), "--backend", "slurm", "--dry-run"]) == 2
    assert main(["plan", str(path)]) == 2
    assert "'llava_next_video'" in capsys.readouterr().err
    assert not (tmp_path / "storage").exists(), "a refused submit must write nothing"


def test_plain_llama_base_and_foreign_architecture_are_refused(tmp_path, tiny_dir):
    llama = model_copy(tmp_path, tiny_dir, model_type="llama", architectures=["LlamaForCausalLM"])
    found = problems(load_spec(write_spec(tmp_path, tiny_dir, model={"base": str(llama)})))
    assert len(found) == 1 and found[0].startswith("model.base:") and "'llama'" in found[0]
    shutil.rmtree(llama)
    odd = model_copy(tmp_path, tiny_dir, architectures=["LlavaForSomethingElse"])
    found = problems(load_spec(write_spec(tmp_path, tiny_dir, model={"base": str(odd)})))
    assert found and "LlavaForSomethingElse" in found[0]


def test_image_folder_holding_other_files_is_refused_naming_the_sample(tmp_path, tiny_dir):
    other = tmp_path / "other-images"
    other.mkdir()
    (other / "readme.txt").write_text("not the images")
    found = problems(load_spec(write_spec(tmp_path, tiny_dir, data={"image_folder": str(other)})))
    assert [p.split(":")[0] for p in found] == ["data.train", "data.eval"]
    assert "sample 0" in found[0] and "not found" in found[0]


def without_token(tmp: Path, tiny, token: str) -> Path:
    """A copy of the tiny base whose tokenizer lacks `token` (as a base from another family would)."""
    base = model_copy(tmp, tiny)
    tok = json.loads((base / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != token]
    tok["model"]["vocab"].pop(token, None)
    (base / "tokenizer.json").write_text(json.dumps(tok))
    config_path = base / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key in ("added_tokens_decoder", "extra_special_tokens", "additional_special_tokens"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config))
    return base


def test_template_whose_end_of_turn_is_not_in_the_vocabulary_is_refused(tmp_path, tiny_dir):
    base = without_token(tmp_path, tiny_dir, "<|im_end|>")
    found = problems(load_spec(write_spec(tmp_path, tiny_dir, model={"base": str(base), "template": "chatml"})))
    assert len(found) == 1 and found[0].startswith("model.template:") and "<|im_end|>" in found[0], found


def test_tokenizer_without_image_token_is_refused(tmp_path, tiny_dir):
    base = without_token(tmp_path, tiny_dir, "<image>")
    found = problems(load_spec(write_spec(tmp_path, tiny_dir, model={"base": str(base)})))
    assert any(p.startswith("model.base:") and "<image>" in p for p in found), found


@pytest.mark.parametrize("content, expected", [
    ("this is not json", "not JSON"),
    ("[]", "holds no samples"),
    ('[{"id": "a", "conversations": []}, {"id": ', "sample 1"),
])
def test_train_file_that_does_not_parse_is_refused(tmp_path, tiny_dir, content, expected):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    found = problems(load_spec(write_spec(tmp_path, tiny_dir, data={"train": str(bad)})))
    assert len(found) == 1 and found[0].startswith("data.train:") and expected in found[0], found


def test_dry_run_fails_exactly_when_the_real_submit_would(tmp_path, tiny_dir, capsys):
    """A different spec under an existing run name: the real submit refuses, so must the dry run."""
    path = write_spec(tmp_path, tiny_dir)
    assert main(["submit", str(path), "--backend", "slurm", "--dry-run"]) == 0
    from llava_cluster.rundir import RunDir
    from llava_cluster.spec.frozen import freeze

    spec = load_spec(path)
    freeze(spec, RunDir(spec.run_dir))
    assert main(["submit", str(path), "--backend", "slurm", "--dry-run"]) == 0  # the same spec: fine
    capsys.readouterr()
    assert main(["submit", str(path), "optim.lr=1e-3", "--backend", "slurm", "--dry-run"]) == 2
    assert "different spec" in capsys.readouterr().err
    with pytest.raises(UserError, match="different spec"):
        preflight(load_spec(path, ["optim.lr=1e-3"]))


def test_train_stage_refuses_before_starting_its_ranks_and_records_why(tmp_path, tiny_dir):
    """The base was swapped after submit: the stage stops in seconds, not under a torchrun traceback."""
    from llava_cluster.rundir import RunDir
    from llava_cluster.spec.frozen import freeze

    base = model_copy(tmp_path, tiny_dir)
    spec = load_spec(write_spec(tmp_path, tiny_dir, model={"base": str(base)}, resources={"gpus_per_node": 2}))
    run = RunDir(spec.run_dir)
    freeze(spec, run)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "llava_next"}))
    proc = subprocess.run([sys.executable, "-m", "llava_cluster.cli", "stage", "train", "--run-dir", str(run.root)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "torch.distributed" not in proc.stderr
    state = run.read_state("train")
    assert state.status == "failed" and "llava_next" in state.error


def test_a_deepspeed_json_missing_here_is_a_preflight_problem(tmp_path, tiny_dir):
    """The spec loads (on Kubernetes the JSON may be on the cluster's volume only); submit refuses."""
    missing = tmp_path / "ds.json"
    found = problems(load_spec(write_spec(tmp_path, tiny_dir, training={"deepspeed": str(missing)})))
    assert found == [f"training.deepspeed: file not found: {missing}"]


def environment_with_lmms_eval(folder: Path) -> Path:
    """An interpreter whose environment has lmms-eval's package metadata (what preflight reads; the
    package itself does not install beside training's pins): this python with a site folder added."""
    info = folder / "site" / "lmms_eval-0.7.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmms_eval\nVersion: 0.7.3\n")
    python = folder / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\nPYTHONPATH={folder / "site"} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return python


NOT_INSTALLED = ("validation.lmms_eval: lmms-eval is not installed for {}: install it (pip install lmms-eval, best "
                 "in an environment of its own, its pins clash with training's) and point validation.lmms_eval.python "
                 "at that environment's python, or remove validation.lmms_eval")


def test_an_lmms_eval_block_that_would_be_skipped_after_training_is_refused_now(tmp_path, tiny_dir):
    nowhere = {"tasks": ["mme"], "include_path": str(tmp_path / "tasks"), "python": str(tmp_path / "env/bin/python")}
    spec = load_spec(write_spec(tmp_path, tiny_dir, validation={"lmms_eval": nowhere}))
    assert problems(spec, backend="local") == [
        f"validation.lmms_eval.include_path: folder not found: {tmp_path / 'tasks'} (the local task YAMLs)",
        f"validation.lmms_eval.python: {tmp_path / 'env/bin/python'} not found (a path, or a name on PATH)"]
    spec.validation.lmms_eval.python = sys.executable  # this venv: no lmms-eval in it
    spec.validation.lmms_eval.include_path = None
    assert problems(spec, backend="local") == [NOT_INSTALLED.format(sys.executable)]
    spec.data.eval = None  # and the validate stage would not even run
    assert problems(spec, backend="local") == [
        "validation.lmms_eval: runs in the validate stage, which needs held-out samples: set data.eval or remove "
        "validation.lmms_eval", NOT_INSTALLED.format(sys.executable)]
    spec.data.eval = str(tiny_dir.val)
    spec.validation.lmms_eval.python = str(environment_with_lmms_eval(tmp_path / "lmms-env"))
    assert problems(spec, backend="local") == []


def test_the_lmms_eval_package_is_checked_only_where_the_validate_stage_uses_this_interpreter(tmp_path, tiny_dir,
                                                                                                capsys):
    """A container's, a pod's or slurm.python's environment is not this one: lmms-eval may be there."""
    path = write_spec(tmp_path, tiny_dir, validation={"lmms_eval": {"tasks": ["mme"]}})
    assert main(["submit", str(path), "--dry-run"]) == 2  # local
    assert NOT_INSTALLED.format(sys.executable) in " ".join(capsys.readouterr().err.split())
    assert main(["submit", str(path), "--backend", "slurm", "--dry-run"]) == 2  # the submitting venv's python
    assert "lmms-eval is not installed" in capsys.readouterr().err
    for elsewhere in (["slurm.container.runtime=pyxis", "slurm.container.image=lmms.sqsh"],
                      ["slurm.python=/opt/env/bin/python -m llava_cluster.cli"]):
        assert main(["submit", str(path), *elsewhere, "--backend", "slurm", "--dry-run"]) == 0, elsewhere
    capsys.readouterr()
    spec = load_spec(path, ["slurm.python=/opt/env/bin/python -m llava_cluster.cli",
                            f"validation.lmms_eval.python={sys.executable}"])  # the block names one here
    assert problems(spec, backend="slurm") == [NOT_INSTALLED.format(sys.executable)]
    assert problems(spec, backend="k8s") == problems(spec) == []  # k8s; the train stage (no backend)


def test_a_spec_without_template_takes_the_family_default_and_preflight_checks_that_one(tmp_path, tiny_dir):
    """A v1.6 Mistral base left on Vicuna's template would train without an error: no template in the
    spec means the base's family's (read from config.json), and preflight checks the template resolved."""
    spec = load_spec(write_spec(tmp_path, tiny_dir, model={"base": str(tiny_dir.model)}))
    assert spec.model.template is None and spec.model.chat_template() == "vicuna_v1"
    config_path = Path(tiny_dir.model) / "config.json"
    next_like = tmp_path / "next-like"
    shutil.copytree(tiny_dir.model, next_like)
    config = json.loads(config_path.read_text())
    config.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"])
    config["text_config"]["model_type"] = "mistral"
    (next_like / "config.json").write_text(json.dumps(config))
    assert load_spec(write_spec(tmp_path, tiny_dir, model={"base": str(next_like)})).model.chat_template() \
        == "mistral_instruct"
    onevision_like = without_token(tmp_path, tiny_dir, "<|im_end|>")
    config = json.loads((onevision_like / "config.json").read_text())
    config.update(model_type="llava_onevision", architectures=["LlavaOnevisionForConditionalGeneration"])
    config["text_config"]["model_type"] = "qwen2"
    (onevision_like / "config.json").write_text(json.dumps(config))
    found = problems(load_spec(write_spec(tmp_path, tiny_dir, model={"base": str(onevision_like)})))
    assert any(p.startswith("model.template: 'chatml'") for p in found), found
