"""Scoring a run's checkpoints as base + adapter on data.eval, once: the merge stage
(`merge.checkpoint: best`) and the validate stage (`validation.checkpoints`) share the scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llava_cluster.errors import UserError
from llava_cluster.rundir import RunDir, atomic_write_json
from llava_cluster.spec import RunSpec
from llava_cluster.validate.evaluate import score


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
        scored = score("adapter", ckpt, spec.model.base, Path(spec.data.eval), folder, spec.model.chat_template(),
                       spec.data.image_aspect_ratio, spec.data.max_length, v.max_samples, v.batch_size,
                       v.max_new_tokens, ckpt.name)
        rows.append({"step": int(ckpt.name.removeprefix("checkpoint-")), "path": str(ckpt), **scored.means})
    best = min(rows, key=lambda r: (r["eval_loss"], -r["exact_match"]))
    result = {"checkpoints": rows, "best": {"step": best["step"], "path": best["path"], "by": "eval_loss"}}
    atomic_write_json(run.checkpoint_scores, result)
    return result
