"""The `validate` command and stage: a fine-tune on held-out samples (batched greedy generation, exact
match and token F1 against the references, teacher-forced eval loss: evaluate.py), the base model on
the same samples for comparison, and the outputs: predictions, metrics and a report. Works on a
merged checkpoint or on base + adapter (`train/final`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llava_cluster.console import console
from llava_cluster.errors import UserError
from llava_cluster.rundir import RunDir, atomic_write_json, atomic_write_text
from llava_cluster.spec import RunSpec
from llava_cluster.validate.checkpoints import score_checkpoints
from llava_cluster.validate.evaluate import score
from llava_cluster.validate.lmms_eval import LmmsEvalSpec, run_lmms_eval
from llava_cluster.validate.scoring import SCORING


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


def validate_stage(spec: RunSpec, run: RunDir) -> int:
    if not spec.data.eval:
        raise UserError("data.eval is not set in the spec: validation needs held-out samples")
    model_dir = run.merged_dir if run.merged_dir.is_dir() else run.final_dir
    v = spec.validation
    checkpoints = score_checkpoints(spec, run, v.checkpoints) if v.checkpoints != "final" else None
    metrics = validate(model_dir, Path(spec.data.eval), Path(spec.data.image_folder) if spec.data.image_folder else None,
                       run.validate_dir, base=Path(spec.model.base), template=spec.model.chat_template(),
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
