"""Refuse early: everything about a run that can be checked from the submitting machine, checked
before a job is queued (`submit`, `submit --dry-run`, `plan`) and again by the train stage before it
starts its ranks.

A refusal an hour into a queue wait, on every rank under a torchrun traceback, is what this saves.
`plan` runs the model checks only (it reads no data). The checks are cheap (config and tokenizer files, one pass over the data files without images, the
first few images), and every problem found is reported at once, each naming its field and file:

  model       config.json is a supported LLaVA (model_type and architecture, exact list below)
  tokenizer   the base's tokenizer holds `<image>` as one token, and the template's end-of-turn
              string is in its vocabulary (else every reply would be supervised without an end)
  data        data.train / data.eval parse, hold samples, and the first image paths resolve to
              readable images inside data.image_folder
  run name    the run directory is free or holds the same spec
  lmms-eval   validation.lmms_eval can run: data.eval is set, include_path is a folder, and where the
              validate stage uses this machine's interpreter (local, SLURM without a container) the
              package is installed for it (~0.1 s: its metadata, not an import)
"""

from __future__ import annotations

import itertools
from pathlib import Path

from llava_cluster.errors import UserError
from llava_cluster.model.family import FAMILIES
from llava_cluster.spec import RunSpec, deepspeed_setup

# model_type -> the architecture llava-cluster trains; the only bases the product accepts (model/family.py).
SUPPORTED_MODELS = {t: f.model_class for t, f in FAMILIES.items()}
IMAGES_CHECKED = 16  # first image paths of each data file that must resolve before a job is queued


def model_problems(spec: RunSpec) -> list[str]:
    from llava_cluster.model.load import read_llava_config

    try:
        config = read_llava_config(spec.model.base)
    except UserError as err:
        return [f"model.base: {err.message}"]
    wanted = SUPPORTED_MODELS[config["model_type"]]
    archs = config.get("architectures") or [wanted]
    if wanted not in archs:
        return [f"model.base: {spec.model.base}/config.json names architectures {archs}; llava-cluster "
                f"fine-tunes {', '.join(f'{a} (model_type {t!r})' for t, a in SUPPORTED_MODELS.items())} only"]
    return []


def _problems_of_tokenizer(spec: RunSpec) -> list[str]:
    from transformers import AutoTokenizer

    from llava_cluster.data.encode import image_token_id
    from llava_cluster.data.templates import get_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.model.base)
    except Exception as err:  # transformers raises many types for a missing or broken tokenizer
        return [f"model.base: no usable tokenizer in {spec.model.base} ({type(err).__name__}: {err})"]
    problems = []
    try:
        image_token_id(tokenizer)
    except UserError as err:
        problems.append(f"model.base: {err.message}")
    template = get_template(spec.model.chat_template())
    eot = template.eot.strip()
    if eot:
        ids = tokenizer(eot, add_special_tokens=False)["input_ids"]
        special = eot.startswith("<") and eot.endswith(">")
        if tokenizer.unk_token_id in ids or (special and len(ids) != 1):
            problems.append(
                f"model.template: {template.name!r} ends each reply with {eot!r}, which the tokenizer of "
                f"{spec.model.base} does not have as a token (it becomes {ids}); pick the template of this model")
    return problems


def _problems_of_data(key: str, path: str, image_folder: str | None) -> list[str]:
    from llava_cluster.data.check import ImageChecker
    from llava_cluster.data.reader import SampleReader

    try:
        reader = SampleReader(path)
        records = iter(reader)
        first = list(itertools.islice(records, 1))
    except UserError as err:
        return [f"{key}: {err.message}"]
    problems: list[str] = []
    images: list[tuple[int, str]] = []
    count = 0
    for record in itertools.chain(first, records):
        if record.error:
            problems.append(f"{key}: {path} sample {record.index}: {record.error} "
                            f"(`llava-cluster data check {path}` lists every defect)")
            break
        count += 1
        value = record.value
        if isinstance(value, dict) and value.get("image") and len(images) < IMAGES_CHECKED:
            images.append((record.index, str(value["image"])))
    if not problems and count == 0:
        problems.append(f"{key}: {path} holds no samples")
    if images and not image_folder:
        problems.append(f"data.image_folder: {key} has image samples (sample {images[0][0]}: "
                        f"{images[0][1]!r}) but no image folder is set")
    elif images and Path(image_folder).is_dir():  # a missing folder is reported once, by _problems_of_inputs
        checker = ImageChecker(image_folder)
        try:
            for index, rel in images:
                found = checker.submit(rel).result()
                if found:
                    problems.append(f"{key}: sample {index}: {found[1]} (data.image_folder {image_folder})")
                    break
        finally:
            checker.close()
    return problems


def _problems_of_run_name(spec: RunSpec) -> list[str]:
    from llava_cluster.rundir import RunDir
    from llava_cluster.spec.frozen import frozen_spec_conflict

    conflict = frozen_spec_conflict(spec, RunDir(spec.run_dir))
    return [f"name: {conflict}"] if conflict else []


def _problems_of_inputs(spec: RunSpec) -> list[str]:
    problems = []
    if spec.data.image_folder and not Path(spec.data.image_folder).is_dir():
        problems.append(f"data.image_folder: folder not found: {spec.data.image_folder}")
    try:
        deepspeed_setup(spec.training)
    except UserError as err:
        problems.append(err.message)
    return problems


def lmms_eval_interpreter_is_here(spec: RunSpec, backend: str | None) -> bool:
    """Whether the validate stage will start lmms-eval with an interpreter this machine can ask: on
    the local backend, or on SLURM without a container when that interpreter is the block's own or the
    submitting venv's (slurm.python unset). A container's, a pod's or slurm.python's environment is
    not this one: lmms-eval may well be installed there."""
    if backend == "local":
        return True
    if backend == "slurm" and spec.slurm.container.runtime == "none":
        return bool(spec.validation.lmms_eval.python) or not spec.slurm.python
    return False


def _problems_of_lmms_eval(spec: RunSpec, backend: str | None) -> list[str]:
    """A requested lmms-eval run that would be skipped after training (the validate stage keeps its own
    scores and only warns): said now, when the fix costs a minute, not hours of training later."""
    import shutil

    from llava_cluster.validate.lmms_eval import installed_version, interpreter

    block = spec.validation.lmms_eval
    if block is None:
        return []
    found = []
    if not spec.data.eval:
        found.append("validation.lmms_eval: runs in the validate stage, which needs held-out samples: set "
                     "data.eval or remove validation.lmms_eval")
    if block.include_path and not Path(block.include_path).is_dir():
        found.append(f"validation.lmms_eval.include_path: folder not found: {block.include_path} (the local "
                     "task YAMLs)")
    if lmms_eval_interpreter_is_here(spec, backend):
        python = interpreter(block)
        if block.python and not shutil.which(block.python):
            found.append(f"validation.lmms_eval.python: {block.python} not found (a path, or a name on PATH)")
        elif installed_version(python) is None:
            found.append(f"validation.lmms_eval: lmms-eval is not installed for {python}: install it (pip install "
                         "lmms-eval, best in an environment of its own, its pins clash with training's) and point "
                         "validation.lmms_eval.python at that environment's python, or remove validation.lmms_eval")
    return found


def problems(spec: RunSpec, *, run_name: bool = True, backend: str | None = None) -> list[str]:
    """Every problem found, one line each, naming the spec field it concerns. `backend` (submit's) says
    where the validate stage will run: lmms-eval's package is checked only where that is this machine."""
    found = model_problems(spec) + _problems_of_inputs(spec) + _problems_of_lmms_eval(spec, backend)
    if not found:  # a tokenizer is only worth loading from a base that is a LLaVA
        found += _problems_of_tokenizer(spec)
    found += _problems_of_data("data.train", spec.data.train, spec.data.image_folder)
    if spec.data.eval:
        found += _problems_of_data("data.eval", spec.data.eval, spec.data.image_folder)
    if run_name:
        found += _problems_of_run_name(spec)
    return found


def preflight(spec: RunSpec, *, run_name: bool = True, what: str = "submitting",
              backend: str | None = None) -> None:
    """Raise one UserError listing every problem; return quietly when the run can start."""
    found = problems(spec, run_name=run_name, backend=backend)
    if found:
        lines = "\n".join(f"  {p}" for p in found)
        raise UserError(f"run {spec.name!r} cannot start ({len(found)} problem(s) found before {what}):\n{lines}")

