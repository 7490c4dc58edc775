"""Validate a fine-tune on held-out samples: batched greedy generation, exact match and token F1
against the references, teacher-forced eval loss, the base model on the same samples for
comparison, and a report. Works on a merged checkpoint or on base + adapter (`train/final`)."""

from __future__ import annotations

import argparse
import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cluster.console import console, err_console
from llava_cluster.errors import UserError
from llava_cluster.rundir import RunDir, atomic_write_json, atomic_write_text
from llava_cluster.spec import RunSpec
from llava_cluster.validate.lmms_eval import LmmsEvalSpec, run_lmms_eval


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


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


def _check_images_reachable(data: Path, image_folder: Path | None, max_samples: int | None) -> None:
    """Before any model loads: image samples need --image-folder, and it must be a folder."""
    import itertools

    from llava_cluster.data.reader import SampleReader

    if image_folder is not None:
        if not Path(image_folder).is_dir():
            raise UserError(f"image folder not found: {image_folder}")
        return
    for record in itertools.islice(SampleReader(data), max_samples):
        if isinstance(record.value, dict) and record.value.get("image"):
            raise UserError(f"{data} sample {record.index} has an image ({record.value['image']!r}): pass "
                            "--image-folder with the folder its image paths are relative to")


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


SCORING = ("exact_match: prediction and reference equal after lower-casing, removing punctuation and "
           "collapsing whitespace; token_f1: F1 of the normalised words; eval_loss: mean cross-entropy of the "
           "reference reply's tokens, teacher-forced")


def sample_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-sample scores, the input of the means and of the paired statistics."""
    return {"exact_match": list(map(exact_match, predictions, references)),
            "token_f1": list(map(token_f1, predictions, references))}


def _means(scores: dict[str, list[float]]) -> dict[str, float]:
    return {metric: sum(values) / max(len(values), 1) for metric, values in scores.items()}


def _resolve(model_dir: Path, base: Path | None) -> tuple[str, str | None, dict[str, Any]]:
    """('adapter'|'merged', base path or None, metadata)."""
    from llava_cluster.adapter import is_adapter, read_metadata
    from llava_cluster.merge.run import read_merge_info

    if not model_dir.exists():
        raise UserError(f"model folder not found: {model_dir}")
    if is_adapter(model_dir):
        meta = read_metadata(model_dir)
        base_path = str(base) if base else meta.get("base")
        if not base_path:
            raise UserError(f"{model_dir} is an adapter without a recorded base: pass --base DIR")
        return "adapter", base_path, meta
    info = read_merge_info(model_dir)
    return "merged", str(base) if base else info.get("base"), info


def _load(kind: str, model_dir: Path, base: str | None) -> tuple[Any, Any]:
    """The model on the GPU in its stored dtype when there is one (a 7B in fp32 on a 24 GB card would
    not fit), else on the CPU in fp32 (CPU kernels for half precision are slow or missing)."""
    import torch

    from llava_cluster.adapter import load_with_adapter
    from llava_cluster.merge.safetensors_io import stored_dtype
    from llava_cluster.model.load import load_llava, load_processor
    from llava_cluster.precision import torch_dtype

    weights = base if kind == "adapter" else model_dir
    on_gpu = torch.cuda.is_available()
    dtype = torch_dtype(stored_dtype(weights)) if on_gpu else torch.float32
    model = load_with_adapter(weights, model_dir, dtype) if kind == "adapter" else load_llava(weights, dtype=dtype)
    return (model.to("cuda") if on_gpu else model), load_processor(weights)


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
    return Scored(samples, answers, per_sample, {**_means(per_sample), "eval_loss": ev.eval_loss(indices, batch_size)})


def validate(model_dir: Path, data: Path, image_folder: Path | None, out_dir: Path, base: Path | None = None,
             template: str | None = None, max_samples: int | None = 200, batch_size: int = 8,
             max_new_tokens: int = 64, compare_base: bool = True, max_length: int = 2048,
             aspect: str | None = None, metrics_log: Path | None = None,
             provenance: dict[str, Any] | None = None, checkpoints: dict[str, Any] | None = None,
             lmms_eval: LmmsEvalSpec | None = None) -> dict[str, Any]:
    """Score the model (and the base) on `data`; `provenance` adds what the caller knows (e.g. the spec),
    `checkpoints` the scores of the run's checkpoints (score_checkpoints) for the report, `lmms_eval`
    lmms-eval tasks to run on a merged model (lmms_eval.py)."""
    from llava_cluster.validate.provenance import environment, training_summary
    from llava_cluster.validate.report import write_report
    from llava_cluster.validate.stats import compare, grouped

    kind, base_path, meta = _resolve(Path(model_dir), base)
    template = template or meta.get("template") or "vicuna_v1"
    aspect = aspect or meta.get("image_aspect_ratio") or "pad"
    if not Path(data).is_file():
        raise UserError(f"validation data not found: {data}")
    _check_images_reachable(Path(data), image_folder, max_samples)
    contenders = [("finetuned", kind, Path(model_dir))]
    if compare_base and base_path:
        contenders.append(("base", "merged", Path(base_path)))
    scored = {label: score(how, path, base_path, Path(data), image_folder, template, aspect, max_length,
                           max_samples, batch_size, max_new_tokens, label)
              for label, how, path in contenders}
    samples = scored["finetuned"].samples
    references = [s["conversations"][-1]["value"] for s in samples]
    answers = {label: sc.answers for label, sc in scored.items()}
    per_sample = {label: sc.per_sample for label, sc in scored.items()}
    results = {label: sc.means for label, sc in scored.items()}

    metrics = {"samples": len(samples), "template": template, "model": str(model_dir), "base_model": base_path,
               **results, "groups": grouped(samples, per_sample)}
    if "base" in per_sample:
        metrics["comparison"] = compare(per_sample["base"], per_sample["finetuned"])
    if checkpoints:
        metrics["checkpoints"], metrics["best_checkpoint"] = checkpoints["checkpoints"], checkpoints["best"]
    if lmms_eval:
        metrics["lmms_eval"] = run_lmms_eval(lmms_eval, Path(model_dir), kind, Path(out_dir))
    metrics["provenance"] = {
        **environment(), "model_kind": kind, "adapter_step": meta.get("step"), "spec_digest": meta.get("spec_digest"),
        "method": meta.get("method"), "template": template,
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        "scoring": SCORING, "training": training_summary(metrics_log), **(provenance or {}),
    }
    out_dir = Path(out_dir)
    rows = []
    for i, sample in enumerate(samples):
        rows.append({
            "id": sample.get("id"), "image": sample.get("image"),
            "prompt": sample["conversations"][-2]["value"], "reference": references[i],
            **{f"{label}_prediction": answers[label][i] for label in answers},
            **{f"{label}_{metric}": values[i] for label in per_sample for metric, values in per_sample[label].items()},
        })
    atomic_write_text(out_dir / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out_dir / "metrics.json", metrics)
    write_report(out_dir, metrics, rows, image_folder, metrics_log)
    return metrics


def print_metrics(metrics: dict[str, Any], out_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"validation on {metrics['samples']} held-out samples")
    table.add_column("model")
    for col in ("exact match", "token F1", "eval loss"):
        table.add_column(col, justify="right")
    for label in ("base", "finetuned"):
        if label in metrics:
            m = metrics[label]
            table.add_row(label, f"{m['exact_match']:.1%}", f"{m['token_f1']:.3f}", f"{m['eval_loss']:.3f}")
    console.print(table)
    comparison = metrics.get("comparison")
    if comparison:
        em, f1 = comparison["exact_match"], comparison["token_f1"]
        changed = comparison["changes"]
        console.print(
            f"exact match {metrics['base']['exact_match']:.0%} -> {metrics['finetuned']['exact_match']:.0%} "
            f"({em['delta'] * 100:+.0f} points, 95% CI {em['ci_low'] * 100:+.0f} to {em['ci_high'] * 100:+.0f}; "
            f"McNemar p={comparison['mcnemar_exact_match']['p_value']:.2g}), token F1 {f1['delta']:+.3f} "
            f"(95% CI {f1['ci_low']:+.3f} to {f1['ci_high']:+.3f}); {changed['improved']} improved, "
            f"{changed['regressed']} regressed, {changed['unchanged']} unchanged", highlight=False)
    console.print(f"report: {out_dir / 'report.html'}")


def score_checkpoints(spec: RunSpec, run: RunDir, which: str) -> dict[str, Any]:
    """Score the last (`which` "last") or every ("all") complete checkpoint as base + adapter on data.eval.

    The scores and the best checkpoint (lowest eval loss, then highest exact match) are written to
    train/checkpoint_scores.json; a later call that needs no other checkpoint reuses them, so the merge
    stage (`merge.checkpoint: best`) and the validate stage score each checkpoint once.
    """
    if not spec.data.eval:
        raise UserError("scoring checkpoints needs held-out samples: set data.eval")
    complete = run.checkpoints()
    chosen = complete if which == "all" else complete[-1:]
    if not chosen:
        raise UserError(f"{run.train_dir} holds no complete checkpoint to score (training.save_steps "
                        f"{spec.training.save_steps} may exceed the run's steps)")
    if run.checkpoint_scores.is_file():
        saved = json.loads(run.checkpoint_scores.read_text())
        if {str(c) for c in chosen} <= {row["path"] for row in saved["checkpoints"]}:
            return saved
    v, folder = spec.validation, Path(spec.data.image_folder) if spec.data.image_folder else None
    rows = []
    for ckpt in chosen:
        scored = score("adapter", ckpt, spec.model.base, Path(spec.data.eval), folder, spec.model.template,
                       spec.data.image_aspect_ratio, spec.data.max_length, v.max_samples, v.batch_size,
                       v.max_new_tokens, ckpt.name)
        rows.append({"step": int(ckpt.name.removeprefix("checkpoint-")), "path": str(ckpt), **scored.means})
    best = min(rows, key=lambda r: (r["eval_loss"], -r["exact_match"]))
    result = {"checkpoints": rows, "best": {"step": best["step"], "path": best["path"], "by": "eval_loss"}}
    atomic_write_json(run.checkpoint_scores, result)
    return result


def validate_stage(spec: RunSpec, run: RunDir) -> int:
    if not spec.data.eval:
        raise UserError("data.eval is not set in the spec: validation needs held-out samples")
    model_dir = run.merged_dir if run.merged_dir.is_dir() else run.final_dir
    v = spec.validation
    checkpoints = score_checkpoints(spec, run, v.checkpoints) if v.checkpoints != "final" else None
    metrics = validate(model_dir, Path(spec.data.eval), Path(spec.data.image_folder) if spec.data.image_folder else None,
                       run.validate_dir, base=Path(spec.model.base), template=spec.model.template,
                       max_samples=v.max_samples, batch_size=v.batch_size, max_new_tokens=v.max_new_tokens,
                       compare_base=v.compare_base, max_length=spec.data.max_length,
                       aspect=spec.data.image_aspect_ratio, metrics_log=run.logs_dir / "train_metrics.jsonl",
                       provenance={"run": spec.name, "spec_digest": spec.digest(), "spec": spec.to_dict()},
                       checkpoints=checkpoints, lmms_eval=v.lmms_eval)
    print_metrics(metrics, run.validate_dir)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n"
        "  llava-cluster validate --model runs/my-run/merged --data val.json --image-folder images/\n"
        "  llava-cluster validate --model runs/my-run/train/final --data val.json --image-folder images/ --out report/\n"
        "  llava-cluster validate --model final/ --base llava-1.5-7b-hf/ --data val.json --max-samples 50\n"
    )
    parser.add_argument("--model", required=True, type=Path, help="merged checkpoint, or an adapter folder")
    parser.add_argument("--data", required=True, type=Path, help="held-out LLaVA JSON/JSONL")
    parser.add_argument("--image-folder", type=Path, default=None)
    parser.add_argument("--base", type=Path, default=None,
                        help="base model (for an adapter; also the comparison model). Default: recorded one")
    parser.add_argument("--out", type=Path, default=Path("validate"), help="output folder (default ./validate)")
    parser.add_argument("--template", default=None, help="conversation template (default: the one trained with)")
    parser.add_argument("--max-samples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--no-base", action="store_true", help="skip the base-model comparison")
    parser.add_argument("--json", action="store_true", help="print metrics as JSON")

    def handler(args: argparse.Namespace) -> int:
        metrics = validate(args.model, args.data, args.image_folder, args.out, base=args.base,
                           template=args.template, max_samples=args.max_samples, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, compare_base=not args.no_base,
                           max_length=args.max_length)
        if args.json:
            console.print_json(data=metrics)
        else:
            print_metrics(metrics, args.out)
        return 0

    parser.set_defaults(func=handler)
