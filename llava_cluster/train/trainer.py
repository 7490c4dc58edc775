"""The HF Trainer, specialised: modality-length (or packed-row) sampler, projector learning-rate groups, and saves
that always hold adapter + projector + metadata and are marked complete only when whole."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from llava_cluster.rundir import COMPLETE_MARKER, atomic_write_text, complete_checkpoints, is_rank0
from llava_cluster.train.artifacts import gather_trainable_state, write_artifacts
from llava_cluster.train.model_setup import PROJECTOR


def param_groups(model: torch.nn.Module, decay_names: set[str], weight_decay: float, lr: float,
                 projector_lr: float) -> list[dict[str, Any]]:
    """decay / no-decay × projector / other; the projector at its own learning rate."""
    buckets: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((PROJECTOR in name, name in decay_names), []).append(param)
    groups = []
    for (is_projector, decays), params in sorted(buckets.items()):
        groups.append({
            "params": params,
            "lr": projector_lr if is_projector else lr,
            "weight_decay": weight_decay if decays else 0.0,
            "name": f"{'projector' if is_projector else 'lora'}_{'decay' if decays else 'no_decay'}",
        })
    return groups


def rotate_checkpoints(train_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`, marker first (a folder half deleted is never
    taken for complete). Called only once the newest checkpoint is marked complete: HF's own rotation runs
    inside its save, before our marker, and a kill there left no complete checkpoint at all."""
    if not keep:
        return []
    old = complete_checkpoints(train_dir)[:-keep]
    for path in old:
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return old


class ImageInEveryBatch:
    """Collator wrapper for multi-rank runs: a text-only micro-batch gets one extra row made only of
    image tokens (labels -100) and a blank image: `dummy`, the dataset's `blank_image_item()`, so it has
    the family's inputs (any-resolution: its tiles and `image_sizes`) and that image's token count.

    Under ZeRO-3 every rank must run the same collectives in the same order; a rank whose batch has
    no image would skip the vision tower (and its parameter gathers) while the others run it, and
    the job dies with a collective mismatch — at the latest at an epoch's tail, where the modality
    sampler cannot keep both modalities whole. The extra row costs one image's tokens and changes no
    loss: its labels are all ignored. With packing (items are rows) it becomes a segment of its own
    at the end of the shortest row instead, so it attends to nothing else.
    """

    def __init__(self, collate: Any, dummy: dict[str, Any]):
        self.collate = collate
        self.dummy = dummy

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        if items and isinstance(items[0], list):  # packed rows: the blank image joins the shortest row
            if not any("pixel_values" in item for row in items for item in row):
                k = min(range(len(items)), key=lambda r: sum(len(item["input_ids"]) for item in items[r]))
                items = [[*row, self.dummy] if r == k else row for r, row in enumerate(items)]
        elif not any("pixel_values" in item for item in items):
            items = [*items, self.dummy]
        return self.collate(items)


class LlavaTrainer(Trainer):
    def __init__(self, *args: Any, projector_lr: float, offload_optimizer: bool, metadata: dict[str, Any],
                 pack_length: int | None = None, keep_checkpoints: int | None = None, chunked_loss: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chunked_loss = chunked_loss
        if self.args.save_total_limit:
            raise ValueError("pass keep_checkpoints, not save_total_limit: HF rotates before our COMPLETE marker")
        self.keep_checkpoints = keep_checkpoints
        self.pack_length = pack_length
        self.projector_lr = projector_lr
        self.offload_optimizer = offload_optimizer
        self.metadata = metadata

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """With `chunked_loss`, the training loss without the full logits tensor (train/chunked_loss.py):
        the LLaVA body gives the hidden states, the frozen lm_head is applied to supervised rows in chunks.
        Evaluation (return_outputs) keeps the stock path, which needs the logits."""
        if not self.chunked_loss or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from llava_cluster.train.chunked_loss import chunked_causal_lm_loss, head_weight

        inputs = dict(inputs)
        labels = inputs.pop("labels")
        llava = self.accelerator.unwrap_model(model).base_model.model  # PeftModel -> LlavaForConditionalGeneration
        hidden = llava.model(**inputs).last_hidden_state
        divisor = num_items_in_batch if self.model_accepts_loss_kwargs else None
        with head_weight(llava.lm_head) as weight:
            loss = chunked_causal_lm_loss(hidden, weight, labels, divisor)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and divisor is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer.compute_loss does
        return loss

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        from llava_cluster.data.sampler import ModalityLengthGroupedSampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.pack_length:
            from llava_cluster.train.packing import PackedRowSampler

            sampler = PackedRowSampler(dataset.lengths, self.pack_length,
                                       batch_size=self.args.per_device_train_batch_size,
                                       world_size=self.args.world_size, seed=self.args.seed)
            if is_rank0():
                from llava_cluster.console import err_console

                fill = sum(dataset.lengths) / (len(sampler) * self.pack_length)
                err_console.print(f"packing: {len(dataset)} samples into {len(sampler)} rows of "
                                  f"<= {self.pack_length} tokens ({fill:.1%} full by estimated lengths)")
            return sampler
        return ModalityLengthGroupedSampler(
            dataset.lengths, dataset.is_image,
            batch_size=self.args.per_device_train_batch_size,
            world_size=self.args.world_size,
            grad_accum=self.args.gradient_accumulation_steps,
            seed=self.args.seed,
        )

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        groups = param_groups(opt_model, set(self.get_decay_parameter_names(opt_model)), self.args.weight_decay,
                              self.args.learning_rate, self.projector_lr)
        if self.offload_optimizer:
            # ZeRO-Offload needs DeepSpeed's CPU Adam; built here so our groups and LRs survive.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer = DeepSpeedCPUAdam(groups, lr=self.args.learning_rate,
                                              betas=(self.args.adam_beta1, self.args.adam_beta2),
                                              eps=self.args.adam_epsilon, weight_decay=self.args.weight_decay)
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """All ranks gather the trainable tensors; rank 0 writes adapter + projector + metadata."""
        out = Path(output_dir or self.args.output_dir)
        state = gather_trainable_state(self.model)
        write_artifacts(self.model, state, out, {**self.metadata, "step": self.state.global_step})

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if is_rank0():
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            atomic_write_text(folder / COMPLETE_MARKER, f"{self.state.global_step}\n")
            rotate_checkpoints(Path(self.args.output_dir), self.keep_checkpoints)
