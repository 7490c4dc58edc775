"""The train stage: spec in, `train/checkpoint-*` and `train/final/` out. Runs once per rank."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from llava_cluster.launch.interrupt import (
    INTERRUPT_REASON,
    STOP_CLEARED_ENV,
    clear_stale_stop,
    on_ctrl_c,
    request_stop,
    stopped_note,
)
from llava_cluster.rundir import PREEMPTED_EXIT, STOP_FILE, RunDir, atomic_dir, is_rank0
from llava_cluster.spec import RunSpec, deepspeed_setup
from llava_cluster.train import checkpoint_safety, preemption

FORMAT_VERSION = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(use_cuda: bool) -> None:
    """Create the process group before TrainingArguments: on CPU the HF Trainer otherwise sees world 1."""
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if use_cuda:
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    from llava_cluster.noise import verbose

    printed = io.StringIO()  # DeepSpeed prints its comm-op build on stdout: into the stage log instead
    with contextlib.redirect_stdout(sys.stdout if verbose() else printed):
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    for line in printed.getvalue().splitlines():
        logging.getLogger("deepspeed").info(line)


def metadata(spec: RunSpec) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "base": spec.model.base,
        "template": spec.model.chat_template(),
        "method": spec.method,
        "spec_digest": spec.digest(),
        "run": spec.name,
        "lora": spec.lora.model_dump(),
        "image_aspect_ratio": spec.data.image_aspect_ratio,
        "max_length": spec.data.max_length,
        "precision": spec.training.precision,
    }


def drop_incomplete_checkpoints(run: RunDir) -> None:
    """A checkpoint cut short (no COMPLETE marker) is never resumed from; clear it so the same step
    can be saved again cleanly."""
    complete = set(run.checkpoints())
    for path in run.train_dir.glob("checkpoint-*"):
        if path not in complete:
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def reached_the_end(checkpoint: Path, spec: RunSpec) -> bool:
    """A checkpoint at (or past) the last step: resuming from it must train nothing more. HF would run
    one more step (31 of 30) since it only stops at the end of a step."""
    last = spec.optim.max_steps
    if last <= 0:  # epochs: the Trainer recorded the step count it computed
        last = json.loads((checkpoint / "trainer_state.json").read_text())["max_steps"]
    return checkpoint_step(checkpoint) >= last


def finish_from(checkpoint: Path, run: RunDir) -> None:
    """`train/final` is the last checkpoint's adapter + projector + metadata, byte for byte."""
    from llava_cluster.adapter import ADAPTER_FILES

    if is_rank0():
        with atomic_dir(run.final_dir) as tmp:
            for name in ADAPTER_FILES:
                shutil.copyfile(checkpoint / name, tmp / name)


def train(spec: RunSpec, run: RunDir) -> int:
    """Returns 0 when `train/final` is written, PREEMPTED_EXIT when stopped after a checkpoint."""
    import torch
    from transformers import PrinterCallback, TrainingArguments, set_seed

    from llava_cluster.data.collator import LlavaCollator
    from llava_cluster.data.dataset import LazySupervisedDataset
    from llava_cluster.data.templates import get_template
    from llava_cluster.model.load import load_processor
    from llava_cluster.train.callbacks import (
        MetricsLog,
        ProgressLine,
        ResumingTensorBoard,
        RichProgress,
        event,
        interactive,
    )
    from llava_cluster.train.model_setup import build_model, trainable_summary
    from llava_cluster.train.trainer import ImageInEveryBatch, LlavaTrainer

    started = time.monotonic()
    preemption.install()
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    checkpoint_safety.force_weights_only()
    resume = run.last_checkpoint()
    if resume is not None:
        checkpoint_safety.check_checkpoint(resume)
        if reached_the_end(resume, spec):
            event(f"{resume.name} is the last step: nothing left to train, it becomes train/final")
            finish_from(resume, run)
            return 0
    init_distributed(use_cuda)
    ds_setup = deepspeed_setup(spec.training)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.logs_dir / "tensorboard")
    o, t = spec.optim, spec.training
    pack_length = (t.pack_length or spec.data.max_length) if t.packing else None
    eval_on = bool(spec.data.eval and t.eval_steps)
    args = TrainingArguments(
        output_dir=str(run.train_dir),
        per_device_train_batch_size=o.per_device_batch,
        per_device_eval_batch_size=o.per_device_batch,
        gradient_accumulation_steps=o.grad_accum,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_ratio,
        lr_scheduler_type=o.scheduler,
        num_train_epochs=o.epochs,
        max_steps=o.max_steps,
        max_grad_norm=o.max_grad_norm,
        seed=o.seed,
        data_seed=o.seed,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # LlavaTrainer rotates, after the new checkpoint is COMPLETE
        eval_strategy="steps" if eval_on else "no",
        eval_steps=t.eval_steps if eval_on else None,
        logging_steps=t.logging_steps,
        report_to=["none"],  # ResumingTensorBoard instead of HF's own
        include_num_input_tokens_seen="all" if pack_length else "non_padding",  # for tokens/s
        deepspeed=ds_setup.config,
        use_cpu=not use_cuda,
        ddp_backend=None if use_cuda else "gloo",
        dataloader_num_workers=spec.data.num_workers,
        dataloader_pin_memory=use_cuda,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    set_seed(o.seed)  # before the LoRA layers are created: their init must not depend on the process
    processor = load_processor(spec.model.base)
    template = get_template(spec.model.chat_template())

    def dataset(path: str) -> LazySupervisedDataset:
        return LazySupervisedDataset(path, spec.data.image_folder, processor, template, spec.data.max_length,
                                     image_aspect_ratio=spec.data.image_aspect_ratio)

    train_ds = dataset(spec.data.train)
    if pack_length:
        from llava_cluster.train.packing import PackedDataset, calibrated_lengths

        train_ds = PackedDataset(train_ds, calibrated_lengths(train_ds))
    eval_ds = dataset(spec.data.eval) if eval_on else None
    model = build_model(spec, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if is_rank0():
        counts = trainable_summary(model)
        event(f"start: {spec.method} on {spec.model.base}: {len(train_ds)} samples, world {args.world_size}, "
              f"trainable LoRA {counts['lora']:,} + projector {counts['projector']:,} of {counts['total']:,}")
    stop = preemption.PreemptionCallback(run.train_dir / STOP_FILE)
    if pack_length:
        from llava_cluster.train.packing import PackedCollator

        collate = PackedCollator(processor.tokenizer.pad_token_id)
    else:
        collate = LlavaCollator(processor.tokenizer.pad_token_id)
    if args.world_size > 1:
        collate = ImageInEveryBatch(collate, train_ds.blank_image_item())
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collate,
        callbacks=[stop, ProgressLine(o.per_device_batch * o.grad_accum * args.world_size, to_stdout=not interactive()),
                   *([RichProgress()] if interactive() else []), MetricsLog(run.logs_dir / "train_metrics.jsonl"),
                   *([ResumingTensorBoard()] if importlib.util.find_spec("tensorboard") else [])],  # slim GPU images
        projector_lr=o.projector_lr,
        offload_optimizer=ds_setup.offload_optimizer,
        metadata=metadata(spec),
        pack_length=pack_length,
        keep_checkpoints=t.save_total_limit,
        chunked_loss=t.chunked_loss,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressLine / RichProgress show the same, once
    if is_rank0():
        drop_incomplete_checkpoints(run)
        if not os.environ.get(STOP_CLEARED_ENV):  # ranks started directly (srun, one process)
            clear_stale_stop(run.train_dir)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if resume:
        event(f"resuming from {resume} (step {checkpoint_step(resume)})")
    with on_ctrl_c(first=lambda: request_stop(run.train_dir, INTERRUPT_REASON), second=_abort):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    step = trainer.state.global_step
    if stop.preempted and step >= trainer.state.max_steps:
        event("stop requested during the last step: finishing the run instead")
    elif stop.preempted:
        event(stopped_note(run.train_dir, step))
        return PREEMPTED_EXIT
    trainer.save_model(str(run.final_dir))
    event(f"finished: {run.final_dir} written at step {step} ({time.monotonic() - started:.0f} s)")
    return 0


def _abort() -> None:
    """A second Ctrl-C: stop now, without the checkpoint."""
    raise KeyboardInterrupt

