"""One model (merged checkpoint, or base + adapter) over one held-out file: batched greedy generation,
the answers' scores and the teacher-forced eval loss."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cluster.console import err_console
from llava_cluster.errors import UserError
from llava_cluster.validate.scoring import mean_scores, sample_scores


def select_indices(dataset: Any, max_samples: int | None) -> list[int]:
    """Samples whose last turn is an assistant reply: that reply is the reference."""
    chosen = []
    for i in range(len(dataset)):
        turns = dataset.record(i).get("conversations") or []
        if len(turns) >= 2 and turns[-1].get("from") == "gpt":
            chosen.append(i)
            if max_samples and len(chosen) >= max_samples:
                break
    if not chosen:
        raise UserError(f"{dataset.data_path}: no sample ends with an assistant (gpt) turn to validate against")
    return chosen


class Evaluator:
    """One model (merged, base, or base + adapter) with its processor, over one held-out file."""

    def __init__(self, model: Any, processor: Any, data: Path, image_folder: Path | None, template: str,
                 aspect: str, max_length: int) -> None:
        from llava_cluster.data.dataset import LazySupervisedDataset
        from llava_cluster.data.templates import get_template

        self.model, self.processor = model.eval(), processor
        self.template = get_template(template)
        self.dataset = LazySupervisedDataset(data, image_folder, processor, self.template, max_length,
                                             image_aspect_ratio=aspect)

    def generate(self, indices: list[int], batch_size: int, max_new_tokens: int) -> list[str]:
        import torch

        from llava_cluster.data.encode import conversation_turns

        tokenizer = self.processor.tokenizer
        eot = self.template.eot.strip()
        eot_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
        eos = sorted({i for i in (tokenizer.eos_token_id, eot_id) if i is not None and i != tokenizer.unk_token_id})
        outputs: list[str] = []
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            for start in range(0, len(indices), batch_size):
                samples = [self.dataset.record(i) for i in indices[start:start + batch_size]]
                prompts = [self.template.prompt(conversation_turns(s)[:-1]) for s in samples]
                images = [self.dataset.load_image(s) for s in samples if s.get("image")]
                batch = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
                batch = {k: v.to(self.model.device) for k, v in batch.items()}
                with torch.no_grad():
                    out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
                for row in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True):
                    outputs.append((row.split(eot)[0] if eot else row).strip())
        finally:
            tokenizer.padding_side = side
        return outputs

    def eval_loss(self, indices: list[int], batch_size: int) -> float:
        """Mean per-token loss on the supervised (assistant) tokens, teacher-forced."""
        import torch

        from llava_cluster.data.collator import LlavaCollator

        collate = LlavaCollator(self.processor.tokenizer.pad_token_id)
        total, count = 0.0, 0
        for start in range(0, len(indices), batch_size):
            batch = collate([self.dataset[i] for i in indices[start:start + batch_size]])
            labels = batch.pop("labels")
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            with torch.no_grad():
                logits = self.model(**batch).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(logits.device)
            mask = shift_labels != -100
            if mask.any():
                total += float(torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask],
                                                                 reduction="sum"))
                count += int(mask.sum())
        return total / max(count, 1)


def eval_device(weights: str | Path) -> tuple[str, str]:
    """(device, precision) a model is evaluated in: the GPU in the checkpoint's stored dtype when there
    is one (a 7B in fp32 on a 24 GB card would not fit), else the CPU in fp32 (CPU kernels for half
    precision are slow or missing). Our scoring and the lmms-eval run both follow it."""
    import torch

    from llava_cluster.merge.safetensors_io import stored_dtype

    return ("cuda", stored_dtype(weights)) if torch.cuda.is_available() else ("cpu", "fp32")


def _load(kind: str, model_dir: Path, base: str | None) -> tuple[Any, Any]:
    """The model (merged, or base + adapter) and its processor, where `eval_device` says."""
    from llava_cluster.adapter import load_with_adapter
    from llava_cluster.model.load import load_llava, load_processor
    from llava_cluster.precision import torch_dtype

    weights = base if kind == "adapter" else model_dir
    device, precision = eval_device(weights)
    dtype = torch_dtype(precision)
    model = load_with_adapter(weights, model_dir, dtype) if kind == "adapter" else load_llava(weights, dtype=dtype)
    return model.to(device), load_processor(weights)


@dataclass
class Scored:
    """One model's answers and scores on the held-out samples."""

    samples: list[dict[str, Any]]
    answers: list[str]
    per_sample: dict[str, list[float]]
    means: dict[str, float]  # exact_match, token_f1, eval_loss


def score(how: str, path: Path, base_path: str | None, data: Path, image_folder: Path | None, template: str,
          aspect: str, max_length: int, max_samples: int | None, batch_size: int, max_new_tokens: int,
          label: str) -> Scored:
    """Load one model (merged checkpoint or base + adapter), generate, score and compute the eval loss."""
    model, processor = _load(how, path, base_path)
    ev = Evaluator(model, processor, data, image_folder, template, aspect, max_length)
    indices = select_indices(ev.dataset, max_samples)
    samples = [ev.dataset.record(i) for i in indices]
    err_console.print(f"validating {label}: {path} on {len(indices)} samples")
    answers = ev.generate(indices, batch_size, max_new_tokens)
    per_sample = sample_scores(answers, [s["conversations"][-1]["value"] for s in samples])
    return Scored(samples, answers, per_sample, {**mean_scores(per_sample), "eval_loss": ev.eval_loss(indices, batch_size)})
