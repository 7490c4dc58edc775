"""Checkpoint scoring on the tiny model: every complete checkpoint scored once, the best merged, the
scores reused by the validate stage and shown in its report."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_checkpoints_are_scored_once_and_the_best_is_merged(tmp_path, tiny_dir):
    """merge.checkpoint=best scores every complete checkpoint and merges the lowest eval loss; validate
    (checkpoints=all) reuses those scores and shows them in metrics.json and the report."""
    from test_train import stage, trained

    from llava_cluster.merge.run import read_merge_info
    from llava_cluster.rundir import RunDir

    run_dir = trained(tmp_path, tiny_dir, "best", resources__gpus_per_node=1, merge__checkpoint="best",
                      validation__checkpoints="all")
    run = RunDir(run_dir)
    procs = {name: stage(name, run_dir) for name in ("merge", "validate")}
    for proc in procs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validating checkpoint-2" in procs["merge"].stderr
    assert "validating checkpoint-2" not in procs["validate"].stderr  # the merge's scores are reused
    scores = json.loads(run.checkpoint_scores.read_text())
    assert [r["step"] for r in scores["checkpoints"]] == [2, 4]
    best = min(scores["checkpoints"], key=lambda r: (r["eval_loss"], -r["exact_match"]))
    assert scores["best"]["step"] == best["step"]
    assert read_merge_info(run.merged_dir)["adapter"] == best["path"]
    metrics = json.loads((run.validate_dir / "metrics.json").read_text())
    assert metrics["checkpoints"] == scores["checkpoints"] and metrics["best_checkpoint"] == scores["best"]
    page = (run.validate_dir / "report.html").read_text()
    assert "<h2>Checkpoints</h2>" in page and f"{best['step']} <b>best</b>" in page
