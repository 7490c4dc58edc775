"""The validation report: one self-contained HTML page (images inlined) and a loss-curve PNG.

It opens with what a reviewer decides on: the paired difference of each metric with its interval, how
many samples improved and regressed, then the per-model scores, the per-group breakdown and
lmms-eval's numbers (or why it did not run); the sample table can be filtered to regressions (a few
lines of inline script; the page stays one file), and the provenance (versions, commit, device,
spec) sits collapsed at the end.
"""

from __future__ import annotations

import base64
import html
import io
import json
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
    try:
        import matplotlib
    except ImportError:  # an image without it (e.g. a slim GPU image): the page says there is no curve
        return None

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


def checkpoints_png(rows: list[dict[str, Any]]) -> bytes | None:
    """Held-out eval loss and exact match of each scored checkpoint against its step."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot(steps, [r["eval_loss"] for r in rows], marker="o", color="tab:orange", label="held-out eval loss")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("eval loss")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(steps, [r["exact_match"] for r in rows], marker="s", color="tab:green", label="exact match")
    right.set_ylabel("exact match")
    right.set_ylim(0, 1)
    fig.legend(loc="upper center", ncol=2, fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _checkpoints(metrics: dict[str, Any]) -> str:
    rows = metrics.get("checkpoints")
    if not rows:
        return ""
    best = metrics["best_checkpoint"]["step"]
    plot = checkpoints_png(rows)
    out = ["<h2>Checkpoints</h2>"]
    if plot:
        out.append(f'<img alt="checkpoint scores" src="data:image/png;base64,{base64.b64encode(plot).decode()}">')
    out.append("<table><tr><th>step</th><th>eval loss</th><th>exact match</th><th>token F1</th></tr>")
    for r in rows:
        mark = " <b>best</b>" if r["step"] == best else ""
        out.append(f"<tr><td>{r['step']}{mark}</td><td>{r['eval_loss']:.3f}</td><td>{r['exact_match']:.1%}</td>"
                   f"<td>{r['token_f1']:.3f}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


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


def change(row: dict[str, Any]) -> str:
    """The sample's change, by the same rule as the headline counts (stats.change_of)."""
    from llava_cluster.validate.stats import ORDER, change_of

    base = {m: row[f"base_{m}"] for m in ORDER if f"base_{m}" in row}
    tuned = {m: row[f"finetuned_{m}"] for m in ORDER if f"finetuned_{m}" in row}
    return change_of(base, tuned)


def _comparison(metrics: dict[str, Any]) -> str:
    comparison = metrics.get("comparison")
    if not comparison:
        return "<p>no base comparison (run without --no-base to get the paired statistics)</p>"
    changed = comparison["changes"]
    mcnemar = comparison["mcnemar_exact_match"]
    lines = [f'<p class="changes"><b>{changed["improved"]}</b> improved, <b>{changed["regressed"]}</b> regressed, '
             f'{changed["unchanged"]} unchanged (by exact match, then token F1)</p>',
             "<table><tr><th>metric</th><th>base</th><th>fine-tuned</th><th>difference</th><th>95% CI</th></tr>"]
    for metric, name, scale, fmt in (("exact_match", "exact match", 100, "{:+.1f} pts"),
                                     ("token_f1", "token F1", 1, "{:+.3f}")):
        c = comparison[metric]
        base, tuned = metrics["base"][metric], metrics["finetuned"][metric]
        shown = (f"{base:.1%}", f"{tuned:.1%}") if scale == 100 else (f"{base:.3f}", f"{tuned:.3f}")
        lines.append(f"<tr><td>{name}</td><td>{shown[0]}</td><td>{shown[1]}</td>"
                     f"<td>{fmt.format(c['delta'] * scale)}</td>"
                     f"<td>{fmt.format(c['ci_low'] * scale)} to {fmt.format(c['ci_high'] * scale)}</td></tr>")
    lines.append("</table>")
    lines.append(f"<p>exact McNemar test: {mcnemar['finetuned_only']} samples only the fine-tune answers exactly, "
                 f"{mcnemar['base_only']} only the base; p = {mcnemar['p_value']:.3g}. Intervals: paired bootstrap, "
                 f"{comparison['exact_match']['resamples']} resamples, seed {comparison['exact_match']['seed']}.</p>")
    return "\n".join(lines)


def _groups(metrics: dict[str, Any]) -> str:
    groups = metrics.get("groups") or {}
    labels = [label for label in ("base", "finetuned") if label in metrics]
    out = []
    for kind in ("modality", "category"):
        if not groups.get(kind):
            continue
        out.append(f"<table><tr><th>{kind}</th><th>samples</th>"
                   + "".join(f"<th>{label} EM</th>" for label in labels) + "</tr>")
        for name, g in groups[kind].items():
            out.append(f"<tr><td>{html.escape(name)}</td><td>{g['samples']}</td>"
                       + "".join(f"<td>{g[label]['exact_match']:.1%}</td>" for label in labels) + "</tr>")
        out.append("</table>")
    return "\n".join(out)


def _lmms_eval(metrics: dict[str, Any]) -> str:
    """lmms-eval's headline numbers (lmms_eval.py), or why there are none."""
    record = metrics.get("lmms_eval")
    if not record:
        return ""
    if record["status"] != "ok":
        return (f'<h2>lmms-eval</h2>\n<p class="warn">lmms-eval {html.escape(record["status"])}: '
                f'{html.escape(record["reason"])}</p>')
    limit = f", at most {record['limit']} documents per task" if record.get("limit") else ""
    out = ["<h2>lmms-eval</h2>",
           f"<p>lmms-eval {html.escape(str(record['lmms_eval_version']))}, model {html.escape(record['model'])}"
           f"{limit}; results and per-document outputs in <code>{html.escape(str(Path(record['results']).parent))}"
           "</code></p>",
           "<table><tr><th>task</th><th>metric</th><th>value</th><th>± stderr</th><th>documents</th></tr>"]
    for task, row in record["tasks"].items():
        for name, m in row["metrics"].items():
            arrow = {True: " ↑", False: " ↓"}.get(m.get("higher_is_better"), "")
            stderr = f"{m['stderr']:.4g}" if m["stderr"] is not None else "–"
            out.append(f"<tr><td>{html.escape(task)}</td><td>{html.escape(name)}{arrow}</td>"
                       f"<td>{m['value']:.4g}</td><td>{stderr}</td><td>{row['samples']}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


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
            f'<tr class="{change(row)}"><td>{_thumbnail(images, row.get("image"))}</td>'
            f"<td>{html.escape(row['prompt'])}</td>"
            f"<td>{html.escape(row['reference'])}</td>{_answer(row, 'base') if has_base else ''}"
            f"{_answer(row, 'finetuned')}</tr>"
        )
    provenance = html.escape(json.dumps(metrics.get("provenance", {}), indent=2, sort_keys=True, default=str))
    filters = ('<p class="filters">show: ' + " ".join(
        f'<button onclick="show(\'{k}\')">{k}</button>' for k in ("all", "regressed", "improved", "unchanged"))
        + "</p>") if has_base else ""
    curve_html = (f'<img alt="loss curve" src="data:image/png;base64,{base64.b64encode(curve).decode()}">'
                  if curve else "<p>no training log found for a loss curve</p>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>llava-cluster validation</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }}
td.ok {{ background: #e6f4e6; }} td.miss {{ background: #fbeaea; }}
tr.regressed td:first-child {{ border-left: 4px solid #c0392b; }} tr.improved td:first-child {{ border-left: 4px solid #27ae60; }}
p.changes {{ font-size: 1.15em; }} table {{ margin-bottom: 1em; }} p.warn {{ color: #a04000; }}
</style>
<script>
function show(kind) {{
  for (const row of document.querySelectorAll("#samples tr[class]")) {{
    row.style.display = (kind === "all" || row.classList.contains(kind)) ? "" : "none";
  }}
}}
</script></head><body>
<h1>Validation report</h1>
<p>model <code>{html.escape(str(metrics.get('model')))}</code>, base <code>{html.escape(str(metrics.get('base_model')))}</code>,
template <code>{html.escape(str(metrics.get('template')))}</code>, {metrics['samples']} held-out samples.</p>
<h2>Fine-tune vs base</h2>
{_comparison(metrics)}
<h2>Scores</h2>
<table><tr><th>model</th><th>exact match</th><th>token F1</th><th>eval loss</th></tr>
{_metric_rows(metrics)}
</table>
{_groups(metrics)}
{_lmms_eval(metrics)}
<h2>Training loss</h2>
{curve_html}
{_checkpoints(metrics)}
<h2>Samples{f" (first {MAX_ROWS})" if len(rows) > MAX_ROWS else ""}</h2>
{filters}
<table id="samples"><tr>{head}</tr>
{chr(10).join(body)}
</table>
<details><summary>Provenance: versions, device, run and spec</summary><pre>{provenance}</pre></details>
</body></html>
"""
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path
