"""The validation report: one self-contained HTML page (images inlined) and a loss-curve PNG."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from llava_cluster.data.images import ImageFolder, ImageProblem
from llava_cluster.rundir import atomic_write_bytes, atomic_write_text

MAX_ROWS = 200


def loss_curve_png(metrics_log: Path) -> bytes | None:
    """Training (and eval) loss against step, from logs/train_metrics.jsonl; None without data."""
    from llava_cluster.train.callbacks import read_metrics

    rows = read_metrics(metrics_log)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _thumbnail(images: ImageFolder | None, rel: str | None) -> str:
    if not rel:
        return "<em>text only</em>"
    if images is None:
        return f"<em>{html.escape(rel)} (no image folder)</em>"
    try:
        img = images.load_rgb(rel)
    except ImageProblem as problem:
        return f"<em>{html.escape(problem.message)}</em>"
    img.thumbnail((96, 96))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return f'<img alt="{html.escape(rel)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _answer(row: dict[str, Any], label: str) -> str:
    ok = row.get(f"{label}_exact_match") == 1.0
    return f'<td class="{"ok" if ok else "miss"}">{html.escape(str(row.get(f"{label}_prediction", "")))}</td>'


def _metric_rows(metrics: dict[str, Any]) -> str:
    out = []
    for label in ("base", "finetuned"):
        if label in metrics:
            m = metrics[label]
            out.append(f"<tr><td>{label}</td><td>{m['exact_match']:.1%}</td><td>{m['token_f1']:.3f}</td>"
                       f"<td>{m['eval_loss']:.3f}</td></tr>")
    return "\n".join(out)


def write_report(out_dir: Path, metrics: dict[str, Any], rows: list[dict[str, Any]], image_folder: Path | None,
                 metrics_log: Path | None) -> Path:
    curve = loss_curve_png(metrics_log) if metrics_log else None
    if curve:
        atomic_write_bytes(out_dir / "loss.png", curve)
    has_base = "base" in metrics
    images = ImageFolder(image_folder) if image_folder is not None and Path(image_folder).is_dir() else None
    head = "<th>image</th><th>prompt</th><th>reference</th>" + ("<th>base</th>" if has_base else "") + "<th>fine-tuned</th>"
    body = []
    for row in rows[:MAX_ROWS]:
        body.append(
            f"<tr><td>{_thumbnail(images, row.get('image'))}</td><td>{html.escape(row['prompt'])}</td>"
            f"<td>{html.escape(row['reference'])}</td>{_answer(row, 'base') if has_base else ''}"
            f"{_answer(row, 'finetuned')}</tr>"
        )
    curve_html = (f'<img alt="loss curve" src="data:image/png;base64,{base64.b64encode(curve).decode()}">'
                  if curve else "<p>no training log found for a loss curve</p>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>llava-cluster validation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }}
td.ok {{ background: #e6f4e6; }} td.miss {{ background: #fbeaea; }}
</style></head><body>
<h1>Validation report</h1>
<p>model <code>{html.escape(str(metrics.get('model')))}</code>, base <code>{html.escape(str(metrics.get('base_model')))}</code>,
template <code>{html.escape(str(metrics.get('template')))}</code>, {metrics['samples']} held-out samples.</p>
<table><tr><th>model</th><th>exact match</th><th>token F1</th><th>eval loss</th></tr>
{_metric_rows(metrics)}
</table>
<h2>Training loss</h2>
{curve_html}
<h2>Samples{f" (first {MAX_ROWS})" if len(rows) > MAX_ROWS else ""}</h2>
<table><tr>{head}</tr>
{chr(10).join(body)}
</table>
</body></html>
"""
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path
