"""Training under DeepSpeed on CPU (gloo): ZeRO-3 and ZeRO-2 with 2 ranks, single process, QLoRA,
merge, and resume. Real runs of the `stage` entry on the tiny model, a few steps each."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def write_spec(tmp: Path, tiny, name: str, **changes) -> Path:
    spec = {
        "name": name, "storage": str(tmp / "storage"), "method": "lora",
        "model": {"base": str(tiny.model), "template": "vicuna_v1"},
        "data": {"train": str(tiny.train), "eval": str(tiny.val), "image_folder": str(tiny.images),
                 "max_length": 256, "num_workers": 0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05},
        "optim": {"lr": 2e-3, "projector_lr": 1e-3, "max_steps": 4, "per_device_batch": 2, "seed": 7},
        "training": {"deepspeed": "zero3", "precision": "fp32", "gradient_checkpointing": False,
                     "save_steps": 2, "save_total_limit": 5, "logging_steps": 1,
                     "deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
        "resources": {"nodes": 1, "gpus_per_node": 2},
        "merge": {"dtype": "fp32", "verify": True},
        "validation": {"max_samples": 8, "batch_size": 8, "max_new_tokens": 4},
    }
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def freeze(spec_path: Path) -> Path:
    """Freeze the spec into its run directory (what `submit` does) and return the run dir."""
    from llava_cluster.rundir import RunDir
    from llava_cluster.spec import load_spec
    from llava_cluster.spec.frozen import freeze as freeze_spec

    spec = load_spec(spec_path)
    run = RunDir(spec.run_dir)
    freeze_spec(spec, run)
    return run.root


def stage(stage_name: str, run_dir: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_cluster.cli", "stage", stage_name, "--run-dir", str(run_dir)],
                          env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def trained(tmp: Path, tiny, name: str, **changes) -> Path:
    run_dir = freeze(write_spec(tmp, tiny, name, **changes))
    proc = stage("train", run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_dir) -> Path:
    return trained(tmp_path_factory.mktemp("z3"), tiny_dir, "zero3-2rank")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_dir) -> Path:
    return trained(tmp_path_factory.mktemp("single"), tiny_dir, "single", resources__gpus_per_node=1)


def shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(str(path)).items()}


def assert_complete_save(folder: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
                 "llava_cluster.json"):
        assert (folder / name).is_file(), f"{folder} lacks {name}"
    for f in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        tensors = load_file(str(folder / f))
        assert tensors and all(t.numel() > 0 for t in tensors.values()), f"empty tensor in {folder / f}"


@pytest.mark.slow
def test_zero3_two_ranks_saves_full_adapter_and_projector_everywhere(zero3_run, single_run):
    from llava_cluster.rundir import RunDir

    run = RunDir(zero3_run)
    assert run.read_state("train").status == "succeeded"
    ckpts = run.checkpoints()
    assert [p.name for p in ckpts] == ["checkpoint-2", "checkpoint-4"]
    for folder in [*ckpts, run.final_dir]:
        assert_complete_save(folder)
    final = run.final_dir
    single = RunDir(single_run).final_dir
    assert shapes(final / "adapter_model.safetensors") == shapes(single / "adapter_model.safetensors")
    assert shapes(final / "non_lora_trainables.safetensors") == shapes(single / "non_lora_trainables.safetensors")
    projector = load_file(str(final / "non_lora_trainables.safetensors"))
    assert set(projector) == {f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    lora = load_file(str(final / "adapter_model.safetensors"))
    assert all("language_model" in k for k in lora), "LoRA leaked onto the vision tower"
    assert any(float(t.abs().sum()) > 0 for k, t in lora.items() if "lora_B" in k), "LoRA B never trained"


@pytest.mark.slow
def test_adapter_loads_with_stock_peft_and_projector_differs_from_base(zero3_run, tiny_dir):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    final = Path(zero3_run) / "train" / "final"
    base = LlavaForConditionalGeneration.from_pretrained(tiny_dir.model)
    before = base.model.multi_modal_projector.linear_1.weight.detach().clone()
    model = PeftModel.from_pretrained(base, str(final))
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_dir.model)
    trained_proj = load_file(str(final / "non_lora_trainables.safetensors"))["model.multi_modal_projector.linear_1.weight"]
    assert not torch.equal(trained_proj, before), "projector did not train"


@pytest.mark.slow
def test_zero2_two_ranks_trains(tmp_path, tiny_dir):
    from llava_cluster.rundir import RunDir

    run = RunDir(trained(tmp_path, tiny_dir, "zero2-2rank", training__deepspeed="zero2", optim__max_steps=2))
    assert_complete_save(run.final_dir)


@pytest.mark.slow
def test_merge_matches_base_plus_adapter_and_carries_trained_projector(zero3_run, tiny_dir):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_cluster.adapter import apply_projector
    from llava_cluster.merge.verify import probe_inputs

    proc = stage("merge", zero3_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = LlavaForConditionalGeneration.from_pretrained(Path(zero3_run) / "merged").eval()
    processor = AutoProcessor.from_pretrained(Path(zero3_run) / "merged")
    ref_base = LlavaForConditionalGeneration.from_pretrained(tiny_dir.model)
    apply_projector(ref_base, Path(zero3_run) / "train" / "final")
    reference = PeftModel.from_pretrained(ref_base, str(Path(zero3_run) / "train" / "final")).eval()
    batch = probe_inputs(processor)
    with torch.no_grad():
        diff = (merged(**batch).logits - reference(**batch).logits).abs().max().item()
    assert diff < 1e-5
    trained_proj = load_file(str(Path(zero3_run) / "train" / "final" / "non_lora_trainables.safetensors"))
    assert torch.equal(merged.model.multi_modal_projector.linear_2.bias,
                       trained_proj["model.multi_modal_projector.linear_2.bias"])


@pytest.mark.slow
def test_resume_from_checkpoint_reaches_the_same_adapter(zero3_run, tmp_path, tiny_dir):
    """Stop right after checkpoint-2 (everything later removed), resume: bitwise the same result as
    the uninterrupted run of the same settings (zero3_run: 2 ranks, 4 steps, a checkpoint every 2)."""
    from llava_cluster.rundir import RunDir
    from llava_cluster.spec import load_spec

    full = RunDir(zero3_run)
    settings = load_spec(full.spec_path)
    assert (settings.resources.gpus_per_node, settings.optim.max_steps, settings.training.save_steps) == (2, 4, 2)
    cut = RunDir(freeze(write_spec(tmp_path / "b", tiny_dir, "resume-cut")))
    shutil.copytree(full.train_dir / "checkpoint-2", cut.train_dir / "checkpoint-2")
    (cut.train_dir / "checkpoint-3").mkdir(parents=True)  # a half-written checkpoint: must be ignored
    proc = stage("train", cut.root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from" in proc.stderr and "checkpoint-2" in proc.stderr
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        a, b = load_file(str(full.final_dir / name)), load_file(str(cut.final_dir / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"


@pytest.mark.slow
def test_two_runs_of_one_spec_are_bitwise_identical(single_run, tmp_path, tiny_dir):
    """LoRA init, dropout and data order are all seeded: a rerun (or a requeued job) is reproducible."""
    again = trained(tmp_path, tiny_dir, "single", resources__gpus_per_node=1)
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        a, b = load_file(str(Path(single_run) / "train/final" / name)), load_file(str(again / "train/final" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs between two runs of one spec"


@pytest.mark.slow
def test_qlora_trains_with_vision_and_projector_unquantized(tmp_path, tiny_dir):
    from llava_cluster.rundir import RunDir

    run = RunDir(trained(tmp_path, tiny_dir, "qlora", method="qlora", training__deepspeed="zero2",
                         resources__gpus_per_node=1, optim__max_steps=2))
    assert_complete_save(run.final_dir)
    meta = (run.final_dir / "llava_cluster.json").read_text()
    assert '"method": "qlora"' in meta
    projector = load_file(str(run.final_dir / "non_lora_trainables.safetensors"))
    assert all(t.dtype == torch.float32 for t in projector.values())

    from llava_cluster.merge.run import merge_adapter

    exact = merge_adapter(run.final_dir, tmp_path / "deq", into="dequantized", dtype="fp32", verify=True,
                          streaming=False)
    assert exact.rel_diff is not None and exact.rel_diff < 1e-5
    into_base = merge_adapter(run.final_dir, tmp_path / "full", into="base", dtype="fp32", verify=True,
                              streaming=False)
    assert into_base.into == "base" and (tmp_path / "full" / "model.safetensors").is_file()


@pytest.mark.slow
def test_preemption_signal_saves_checkpoint_and_exits_75(tmp_path, tiny_dir):
    import signal
    import time

    from llava_cluster.rundir import RunDir

    run = RunDir(freeze(write_spec(tmp_path, tiny_dir, "preempt", resources__gpus_per_node=1,
                                   optim__max_steps=400, training__save_steps=1000)))
    proc = subprocess.Popen([sys.executable, "-m", "llava_cluster.cli", "stage", "train", "--run-dir", str(run.root)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 300
    while not (run.logs_dir / "train_metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    state = run.read_state("train")
    assert state.status == "preempted"
    assert run.last_checkpoint() is not None
    assert_complete_save(run.last_checkpoint())
    assert not run.final_dir.exists()


# A checkpoint whose COMPLETE marker cannot be written: the window in which HF's own rotation used to
# delete the previous checkpoint. The write fails as a full disk would (ENOSPC from the marker's write).
FAULT_AT_MARKER = """
import errno, sys
from llava_cluster.train import trainer
real = trainer.atomic_write_text
def full_disk(path, text):
    if path.name == "COMPLETE" and path.parent.name == sys.argv[2]:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real(path, text)
trainer.atomic_write_text = full_disk
from llava_cluster.cli import main
sys.exit(main(["stage", "train", "--run-dir", sys.argv[1]]))
"""

# constant LR: a step trained twice, or once too often, changes every tensor
ROTATE = dict(resources__gpus_per_node=1, optim__max_steps=3, optim__scheduler="constant", optim__warmup_ratio=0.0,
              training__save_steps=2, training__save_total_limit=1, data__eval=None)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory, tiny_dir):
    """One run, limit 1: killed (disk full) between checkpoint-3's save and its marker; checkpoint-2 kept aside;
    then resumed with SIGUSR2 arriving during the last step."""
    import signal

    from llava_cluster.rundir import RunDir

    tmp = tmp_path_factory.mktemp("rotate")
    run = RunDir(freeze(write_spec(tmp, tiny_dir, "rotate", **ROTATE)))
    faulted = subprocess.run([sys.executable, "-c", FAULT_AT_MARKER, str(run.root), "checkpoint-3"], env=ENV,
                             capture_output=True, text=True, timeout=400, cwd=REPO)
    after_fault = {"code": faulted.returncode, "stderr": faulted.stderr, "state": run.read_state("train"),
                   "complete": [p.name for p in run.checkpoints()],
                   "folders": sorted(p.name for p in run.train_dir.glob("checkpoint-*"))}
    shutil.copytree(run.train_dir / "checkpoint-2", tmp / "kept-checkpoint-2")
    proc = subprocess.Popen([sys.executable, "-m", "llava_cluster.cli", "stage", "train", "--run-dir", str(run.root)],
                            env=ENV, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "resuming from" in line:
            proc.send_signal(signal.SIGUSR2)  # seen at the end of step 3, the last one
            break
    lines.append(proc.stderr.read())
    proc.wait(timeout=400)
    return {"run": run, "tmp": tmp, "after_fault": after_fault, "code": proc.returncode, "stderr": "".join(lines)}


@pytest.mark.slow
def test_rotation_keeps_the_last_complete_checkpoint_until_the_new_one_is_complete(rotated):
    fault = rotated["after_fault"]
    assert fault["code"] == 1, fault["stderr"][-3000:]
    assert fault["complete"] == ["checkpoint-2"], fault
    assert fault["folders"] == ["checkpoint-2"], "the unmarked checkpoint-3 should be dropped to free space"
    assert fault["state"].status == "failed"
    # the disk-full path: one message naming the storage and what a checkpoint needs, no traceback
    assert fault["state"].error.startswith("no space left on the storage of"), fault["state"].error
    assert "(checkpoint-2)" in fault["state"].error and "resumes from checkpoint-2" in fault["state"].error
    assert "Traceback" not in fault["stderr"], fault["stderr"][-3000:]


@pytest.mark.slow
def test_resume_then_rotation_keeps_one_checkpoint_and_a_stop_in_the_last_step_still_succeeds(rotated):
    run, err = rotated["run"], rotated["stderr"]
    assert rotated["code"] == 0, err[-4000:]
    assert "checkpoint-2" in err and "stop requested during the last step" in err
    assert [p.name for p in run.checkpoints()] == ["checkpoint-3"]
    assert sorted(p.name for p in run.train_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    assert run.read_state("train").status == "succeeded"
    assert_complete_save(run.final_dir)


@pytest.mark.slow
def test_resume_from_the_last_step_trains_nothing_and_keeps_the_result(rotated, tmp_path, tiny_dir):
    from llava_cluster.rundir import RunDir

    done = rotated["run"]
    again = RunDir(freeze(write_spec(tmp_path, tiny_dir, "at-end", **ROTATE)))
    shutil.copytree(done.train_dir / "checkpoint-3", again.train_dir / "checkpoint-3")
    proc = stage("train", again.root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "nothing left to train" in proc.stderr
    assert not (again.logs_dir / "train_metrics.jsonl").exists(), "a step was trained past max_steps"
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors", "llava_cluster.json"):
        assert (again.final_dir / name).read_bytes() == (done.final_dir / name).read_bytes(), name
    assert again.read_state("train").status == "succeeded"


@pytest.mark.slow
def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(rotated, tmp_path, tiny_dir):
    from llava_cluster.rundir import RunDir

    marker = tmp_path / "PWNED"
    run = RunDir(freeze(write_spec(tmp_path, tiny_dir, "planted", **ROTATE)))
    ckpt = run.train_dir / "checkpoint-2"
    shutil.copytree(rotated["tmp"] / "kept-checkpoint-2", ckpt)
    target = ckpt / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert target.is_file()
    subprocess.run([sys.executable, "-c", PAYLOAD, str(target), str(marker)], check=True)
    proc = stage("train", run.root)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert not marker.exists(), "the planted pickle ran"
    assert "unsafe or corrupt checkpoint" in proc.stderr and target.name in proc.stderr.replace("\n", "")
    state = run.read_state("train")
    assert state.status == "failed" and str(target) in state.error


PAYLOAD = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {sys.argv[2]}",))
torch.save({"optimizer_state_dict": Payload()}, sys.argv[1])
"""


@pytest.mark.slow
def test_zero3_two_ranks_with_the_chunked_loss_match_the_stock_loss(zero3_run, tmp_path, tiny_dir):
    """training.chunked_loss on the same 2-rank ZeRO-3 run (lm_head partitioned): the same losses step by
    step and the same adapter and projector as the stock loss, to fp32 rounding."""
    import json

    chunked = trained(tmp_path, tiny_dir, "zero3-2rank", training__chunked_loss=True)

    def losses(run_dir: Path) -> list[float]:
        rows = [json.loads(line) for line in (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert len(losses(chunked)) == 4
    assert losses(chunked) == pytest.approx(losses(zero3_run), rel=1e-4)
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        got, want = (load_file(str(run / "train" / "final" / name)) for run in (chunked, zero3_run))
        assert got.keys() == want.keys()
        for key in want:
            assert torch.allclose(got[key], want[key], rtol=1e-3, atol=1e-6), key
