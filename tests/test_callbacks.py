"""What a person watching training sees: a real 1-rank tiny training run through `llava-cluster train`
with stdout captured (not a terminal) prints one parseable progress line per logging step, writes the
same lines and the run's events to logs/train.log (shown by `llava-cluster logs`), and none of the
libraries' noise. Resumed sessions: the metrics log drops replayed rows and TensorBoard purges them."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
from test_train import REPO, write_spec
from transformers import TrainerState

from llava_cluster.train.callbacks import MetricsLog, ResumingTensorBoard, read_metrics

STEPS = 4
FIELDS = ("step", "epoch", "loss", "lr_lora", "lr_projector", "grad_norm", "tokens/s", "samples/s", "eta")
NOISE = ("gemm_4bit_forward", "pip install kernels", "requires torchvision", "Setting accelerator to",
         "built successfully", "OMP_NUM_THREADS", "compilers.C.base", "gcc ")


def parse_progress(text: str) -> list[dict[str, str]]:
    """The `progress key=value ...` lines of a log, as dicts."""
    return [dict(field.split("=", 1) for field in m.group(1).split())
            for m in re.finditer(r"^(?:.*: )?progress (.*)$", text, re.MULTILINE)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("progress")
    spec = write_spec(tmp, tiny_dir, "progress", resources__gpus_per_node=1, optim__max_steps=STEPS,
                      training__save_steps=3)
    # DS_ACCELERATOR unset on purpose: DeepSpeed's accelerator guess must not reach the terminal either
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "PYTHONWARNINGS", "LLAVA_CLUSTER_VERBOSE")}
    proc = subprocess.run([sys.executable, "-m", "llava_cluster.cli", "train", str(spec)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return SimpleNamespace(proc=proc, root=tmp / "storage" / "runs" / "progress")


def test_one_parseable_progress_line_per_step_on_stdout_and_in_the_stage_log(run):
    log = (run.root / "logs" / "train.log").read_text()
    for rows in (parse_progress(run.proc.stdout), parse_progress(log)):
        assert [r["step"] for r in rows] == [f"{i}/{STEPS}" for i in range(1, STEPS + 1)]
        for row in rows:
            assert tuple(row) == FIELDS
            float(row["loss"]), float(row["grad_norm"]), float(row["epoch"])
            assert float(row["lr_lora"]) >= 0 and float(row["lr_projector"]) >= 0
            assert float(row["tokens/s"]) > 0 and float(row["samples/s"]) > 0
            assert re.fullmatch(r"\d+:\d\d:\d\d", row["eta"])
    first = parse_progress(log)[0]
    assert float(first["lr_lora"]) == pytest.approx(2e-3) and float(first["lr_projector"]) == pytest.approx(1e-3)
    metrics = [r for r in read_metrics(run.root / "logs" / "train_metrics.jsonl") if "loss" in r]
    assert [f"{r['loss']:.4f}" for r in metrics] == [r["loss"] for r in parse_progress(log)]


def test_events_are_logged_and_logs_shows_them(run):
    shown = subprocess.run([sys.executable, "-m", "llava_cluster.cli", "logs", str(run.root), "train"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "start: lora on " in text and "world 1, trainable LoRA " in text
    assert re.search(rf"checkpoint saved: {re.escape(str(run.root))}/train/checkpoint-3 \(\d+\.\d s\)", text)
    assert f"finished: {run.root}/train/final written at step {STEPS}" in text
    assert len(parse_progress(text)) == STEPS


def test_a_tiny_run_prints_none_of_the_libraries_noise(run):
    printed = run.proc.stdout + run.proc.stderr
    assert [n for n in NOISE if n in printed] == [], printed
    assert "gcc " not in (run.root / "logs" / "train.log").read_text()


def _state(step: int) -> TrainerState:
    return TrainerState(global_step=step, max_steps=10)


def test_a_resumed_session_drops_the_metrics_rows_it_replays(tmp_path):
    path = tmp_path / "train_metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 7):
        log.on_log(None, _state(step), None, logs={"loss": float(step)})
    log.on_log(None, _state(4), None, logs={"eval_loss": 0.5})
    log.on_train_begin(None, _state(4), None)  # resumed from checkpoint-4: steps 5, 6 come again
    for step in (5, 6, 7):
        log.on_log(None, _state(step), None, logs={"loss": 10.0 + step})
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4, 5, 6, 7]
    assert [r["loss"] for r in read_metrics(path) if "loss" in r] == [1, 2, 3, 4, 15, 16, 17]


def test_the_summary_row_does_not_hide_the_last_steps_loss(tmp_path):
    path = tmp_path / "train_metrics.jsonl"
    log = MetricsLog(path)
    log.on_log(None, _state(3), None, logs={"loss": 0.25})
    log.on_log(None, _state(3), None, logs={"train_runtime": 5.0, "train_loss": 0.4})
    rows = read_metrics(path)
    assert [r.get("loss") for r in rows if "loss" in r] == [0.25]
    assert any("train_runtime" in r for r in rows)


def test_tensorboard_after_a_resume_reads_as_one_run_without_repeated_steps(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainingArguments

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    for resumed_at, steps, offset in ((0, range(1, 7), 0.0), (4, range(5, 9), 100.0)):
        cb = ResumingTensorBoard()
        cb.on_train_begin(args, _state(resumed_at), None)
        for step in steps:
            cb.on_log(args, _state(step), None, logs={"loss": offset + step})
        cb.on_train_end(args, _state(steps[-1]), None)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 105), (6, 106), (7, 107), (8, 108)]


@pytest.mark.parametrize("method, verbose, shown", [("lora", False, False), ("qlora", False, True),
                                                    ("lora", True, True)])
def test_bitsandbytes_cpu_kernel_hint_only_for_qlora_or_verbose(method, verbose, shown, monkeypatch):
    from llava_cluster.noise import BNB_LOGGER, VERBOSE_ENV, quiet

    if verbose:
        monkeypatch.setenv(VERBOSE_ENV, "1")
    else:
        monkeypatch.delenv(VERBOSE_ENV, raising=False)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(BNB_LOGGER)
    logger.addHandler(handler)
    try:
        quiet(qlora=method == "qlora")
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: x. Please `pip install kernels`")
    finally:
        logger.removeHandler(handler)
        monkeypatch.setenv(VERBOSE_ENV, "")
        quiet()
    assert bool(seen) is shown


def test_the_stop_note_says_interrupted_after_ctrl_c_and_preempted_after_a_scheduler_signal(tmp_path):
    from llava_cluster.launch.interrupt import INTERRUPT_REASON, request_stop, stopped_note

    request_stop(tmp_path / "signalled")
    request_stop(tmp_path / "ctrl-c", INTERRUPT_REASON)
    request_stop(tmp_path / "ctrl-c")  # a later SIGTERM does not rewrite why it stopped
    assert stopped_note(tmp_path / "signalled", 7) == "preempted at step 7: checkpoint saved — resubmit to resume"
    assert stopped_note(tmp_path / "ctrl-c", 7) == "interrupted at step 7 — run it again to resume"
