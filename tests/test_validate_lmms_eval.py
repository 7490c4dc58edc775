"""The lmms-eval block of the validate stage: results parsing, skip and failure reasons without
lmms-eval, and a real lmms-eval run of a local task over the tiny model's held-out data (no hub).

lmms-eval does not install into the training environment without changing it (it pulls torch 2.14,
a CUDA torchvision, protobuf 6), so the real run uses the interpreter in LMMS_EVAL_PYTHON (an
environment of its own, as `validation.lmms_eval.python` does) or this one, and skips, saying so,
when neither has it.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from llava_cluster.validate.lmms_eval import (
    LmmsEvalSpec,
    eval_argv,
    failure_reason,
    headline,
    installed_version,
    run_lmms_eval,
    summary_lines,
)

# The aggregated results JSON's shape as lmms-eval 0.7.3 writes it (keys trimmed to those read).
RESULTS = {
    "results": {
        "shapes": {"alias": "shapes", "exact_match,none": 0.75, "exact_match_stderr,none": 0.25,
                   "exact_match_stderr_clt,none": 0.2, "exact_match_stderr_clustered,none": "N/A",
                   "submission,none": {"file": "x.json"}},
        "mme": {"alias": "mme", "mme_perception_score,none": 1234.5, "mme_perception_score_stderr,none": "N/A",
                "anls,strict-match": 0.5, "anls_stderr,strict-match": 0.125},
    },
    "higher_is_better": {"shapes": {"exact_match": True}, "mme": {"mme_perception_score": True}},
    "n-samples": {"shapes": {"original": 6, "effective": 4}, "mme": {"original": 2374, "effective": 2374}},
}

# The end of a real lmms-eval 0.7.3 log whose task points at a data file that is not there.
MISSING_DATA_LOG = """\
Traceback (most recent call last):
  File "/env/lib/python3.11/site-packages/datasets/data_files.py", line 413, in resolve_pattern
    raise FileNotFoundError(error_msg)
FileNotFoundError: Unable to find '/data/nowhere/val.json'

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/env/lib/python3.11/site-packages/tenacity/__init__.py", line 433, in exc_check
tenacity.RetryError: RetryError[<Future at 0x7f4f state=finished raised FileNotFoundError>]
\x1b[32m2026-12-02 02:28:17\x1b[0m | \x1b[31m\x1b[1mERROR   \x1b[0m | lmms_eval.__main__:cli_evaluate:614 - \
Error during evaluation: RetryError[<Future at 0x7f4f state=finished raised FileNotFoundError>]. Please set \
`--verbosity=DEBUG` to get more information.\x1b[0m
"""


def test_headline_keeps_each_metric_with_its_stderr_and_drops_the_rest():
    tasks = headline(RESULTS)
    assert tasks["shapes"] == {"samples": 4, "metrics": {
        "exact_match": {"value": 0.75, "stderr": 0.25, "higher_is_better": True}}}
    assert tasks["mme"]["metrics"] == {
        "mme_perception_score": {"value": 1234.5, "stderr": None, "higher_is_better": True},
        "anls,strict-match": {"value": 0.5, "stderr": 0.125, "higher_is_better": None}}
    assert summary_lines(tasks)[0] == "shapes exact_match: 0.75 ± 0.25 (4 documents)"
    assert "mme mme_perception_score: 1234 (2374 documents)" in summary_lines(tasks)


def test_failure_reason_names_the_cause_not_the_retry_wrapper(tmp_path):
    log = tmp_path / "lmms_eval.log"
    log.write_text(MISSING_DATA_LOG)
    assert failure_reason(log, 0) == f"FileNotFoundError: Unable to find '/data/nowhere/val.json' (log: {log})"
    log.write_text("Error during evaluation: Tasks not found: nope. Please set `--verbosity=DEBUG` to get more")
    assert failure_reason(log, 0) == f"Tasks not found: nope (log: {log})"
    log.write_text("Killed\n")
    assert failure_reason(log, 137) == f"lmms-eval exited with code 137 without results (log: {log})"


def test_block_builds_the_command(tmp_path):
    """The block's own refusals are tested with the section (test_spec_lmms_eval.py)."""
    block = LmmsEvalSpec(tasks=["mme", "shapes"], limit=5, include_path=str(tmp_path), python="/env/bin/python")
    argv = eval_argv(block, Path("/runs/r/merged"), Path("/out"), "cuda", "bfloat16")
    assert argv[:4] == ["/env/bin/python", "-m", "lmms_eval", "eval"]
    assert argv[argv.index("--model_args") + 1] == "pretrained=/runs/r/merged,device=cuda,device_map=cuda:0,dtype=bfloat16"
    assert (argv[argv.index("--tasks") + 1], argv[argv.index("--limit") + 1]) == ("mme,shapes", "5")
    assert argv[argv.index("--include_path") + 1] == str(tmp_path.resolve()) and "--force_simple" in argv


def test_missing_package_adapter_and_include_path_are_skipped_with_the_reason(tmp_path, capsys):
    if installed_version(sys.executable):
        pytest.skip("lmms-eval is installed here: the missing-package case cannot be shown")
    merged = tmp_path / "merged"
    merged.mkdir()
    record = run_lmms_eval(LmmsEvalSpec(tasks=["mme"]), merged, "merged", tmp_path / "validate")
    assert record == {"status": "skipped", "tasks_requested": ["mme"], "reason": (
        f"lmms-eval is not installed for {sys.executable}: install it (pip install lmms-eval, best in an environment "
        "of its own, its pins clash with training's) and point validation.lmms_eval.python at that environment's "
        "python")}
    assert "lmms-eval skipped:" in capsys.readouterr().err
    assert not (tmp_path / "validate" / "lmms_eval").exists()  # nothing ran, nothing written
    adapter = run_lmms_eval(LmmsEvalSpec(tasks=["mme"]), tmp_path / "final", "adapter", tmp_path / "validate")
    assert adapter["reason"].startswith(f"lmms-eval loads a full checkpoint and {tmp_path / 'final'} is an adapter")
    nowhere = LmmsEvalSpec(tasks=["mme"], include_path=str(tmp_path / "tasks"))
    assert run_lmms_eval(nowhere, merged, "merged", tmp_path)["reason"] == (
        f"validation.lmms_eval.include_path {tmp_path / 'tasks'} is not a folder (the local task YAMLs)")
    no_python = LmmsEvalSpec(tasks=["mme"], python=str(tmp_path / "env" / "bin" / "python"))
    assert run_lmms_eval(no_python, merged, "merged", tmp_path)["reason"] == (
        f"validation.lmms_eval.python {tmp_path / 'env' / 'bin' / 'python'} not found (a path, or a name on PATH)")


def write_local_task(folder: Path, data: Path, images: Path) -> Path:
    """A local lmms-eval task over LLaVA-format held-out data: the image samples' last question and
    reference (llava_hf cannot run text-only documents), exact match as lmms-eval scores it."""
    folder.mkdir()
    (folder / "tiny_shapes.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_shapes
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: generate_until
        process_docs: !function tiny_utils.with_image
        doc_to_visual: !function tiny_utils.doc_to_visual
        doc_to_text: !function tiny_utils.doc_to_text
        doc_to_target: !function tiny_utils.doc_to_target
        generation_kwargs:
          max_new_tokens: 4
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
            ignore_case: true
            ignore_punctuation: true
        metadata:
          version: 0.0
        """))
    (folder / "tiny_utils.py").write_text(textwrap.dedent(f"""\
        from PIL import Image

        def with_image(dataset):
            return dataset.filter(lambda doc: bool(doc["image"]))

        def doc_to_visual(doc):
            return [Image.open({str(images)!r} + "/" + doc["image"]).convert("RGB")]

        def doc_to_text(doc):
            return doc["conversations"][-2]["value"]

        def doc_to_target(doc):
            return doc["conversations"][-1]["value"]
        """))
    return folder


def lmms_python() -> tuple[str, str]:
    """(interpreter, lmms-eval version) for the real runs, or skip saying why."""
    python = os.environ.get("LMMS_EVAL_PYTHON") or sys.executable
    version = installed_version(python)
    if not version:
        pytest.skip(f"lmms-eval is not installed for {python} (it does not install into this environment "
                    "without changing torch; set LMMS_EVAL_PYTHON to an environment's python that has it)")
    return python, version


@pytest.mark.slow
def test_validate_runs_a_local_lmms_eval_task_on_the_merged_model(tmp_path, request, monkeypatch):
    python, version = lmms_python()
    from llava_cluster.validate.run import validate

    tiny_dir = request.getfixturevalue("tiny_dir")  # after the skip: building it takes a while

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    tasks = write_local_task(tmp_path / "tasks", tiny_dir.val, tiny_dir.images)
    block = LmmsEvalSpec(tasks=["tiny_shapes"], limit=3, include_path=str(tasks), python=python)
    out = tmp_path / "validate"
    metrics = validate(tiny_dir.model, tiny_dir.val, tiny_dir.images, out, max_samples=4, max_new_tokens=3,
                       compare_base=False, lmms_eval=block)

    record = metrics["lmms_eval"]
    assert record["status"] == "ok", record
    assert record["lmms_eval_version"] == version and record["results"] == str(out / "lmms_eval" / "results.json")
    scored = record["tasks"]["tiny_shapes"]
    docs = [json.loads(line) for line in (out / "lmms_eval" / "samples_tiny_shapes.jsonl").read_text().splitlines()]
    image_refs = [s["conversations"][-1]["value"] for s in json.loads(tiny_dir.val.read_text()) if s.get("image")]
    assert scored["samples"] == len(docs) == 3 and [d["target"] for d in docs] == image_refs[:3]
    em = scored["metrics"]["exact_match"]
    assert em["value"] == pytest.approx(sum(d["exact_match"] for d in docs) / 3) and em["higher_is_better"] is True
    assert isinstance(em["stderr"], float)
    assert json.loads((out / "metrics.json").read_text())["lmms_eval"] == record
    assert metrics["finetuned"]["exact_match"] >= 0 and metrics["samples"] == 4  # our own scores are kept
    assert sorted(p.name for p in (out / "lmms_eval").iterdir()) == [
        "lmms_eval.log", "results.json", "samples_tiny_shapes.jsonl"]  # fixed names, lmms-eval's dated folder gone
    assert (out / "lmms_eval" / "lmms_eval.log").stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "<h2>lmms-eval</h2>" in page and f"<td>tiny_shapes</td><td>exact_match ↑</td><td>{em['value']:.4g}</td>" in page


@pytest.mark.slow
def test_a_failed_lmms_eval_run_is_recorded_with_its_log(tmp_path, request, capsys):
    """lmms-eval exits 0 after an error: no results file is what marks the failure, and its message is kept."""
    python, version = lmms_python()
    tiny_dir = request.getfixturevalue("tiny_dir")
    record = run_lmms_eval(LmmsEvalSpec(tasks=["no_such_task"], python=python), tiny_dir.model, "merged", tmp_path)
    log = tmp_path / "lmms_eval" / "lmms_eval.log"
    assert record["status"] == "failed" and record["log"] == str(log) and record["lmms_eval_version"] == version
    assert record["reason"].startswith("ValueError: Tasks not found: no_such_task.") and str(log) in record["reason"]
    assert [p.name for p in (tmp_path / "lmms_eval").iterdir()] == ["lmms_eval.log"]
    assert "lmms-eval failed: ValueError: Tasks not found: no_such_task" in capsys.readouterr().err
