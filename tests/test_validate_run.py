"""`llava-cluster validate` on the tiny model: a real run on an adapter folder (base + adapter) with
the base as comparison, and the input checks that stop before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_validate_an_adapter_writes_predictions_metrics_and_report(tmp_path, tiny_dir):
    """An untrained adapter (B = 0) must score exactly like the base: same answers, same loss."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    from llava_cluster.cli import main
    from llava_cluster.rundir import atomic_write_json
    from llava_cluster.spec import DEFAULT_LORA_TARGETS

    base = LlavaForConditionalGeneration.from_pretrained(tiny_dir.model)
    projector = {k: v.clone() for k, v in base.state_dict().items() if "multi_modal_projector" in k}
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    save_file(projector, str(adapter / "non_lora_trainables.safetensors"))
    atomic_write_json(adapter / "llava_cluster.json", {"base": str(tiny_dir.model), "template": "vicuna_v1"})

    out = tmp_path / "report"
    code = main(["validate", "--model", str(adapter), "--data", str(tiny_dir.val), "--image-folder",
                 str(tiny_dir.images), "--out", str(out), "--max-samples", "6", "--max-new-tokens", "3", "--json"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 6 and metrics["base_model"] == str(tiny_dir.model)
    assert metrics["finetuned"]["eval_loss"] == pytest.approx(metrics["base"]["eval_loss"], rel=1e-5)
    comparison = metrics["comparison"]  # the same answers: no difference, and the statistics say so
    assert (comparison["exact_match"]["delta"], comparison["exact_match"]["ci_low"],
            comparison["exact_match"]["ci_high"]) == (0.0, 0.0, 0.0)
    assert comparison["mcnemar_exact_match"] == {"base_only": 0, "finetuned_only": 0, "p_value": 1.0}
    assert comparison["changes"] == {"improved": 0, "regressed": 0, "unchanged": 6}
    assert sum(g["samples"] for g in metrics["groups"]["modality"].values()) == 6
    provenance = metrics["provenance"]
    assert provenance["libraries"]["torch"] and provenance["device"] == "cpu"
    assert provenance["model_kind"] == "adapter" and provenance["generation"]["max_new_tokens"] == 3
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert all(r["finetuned_prediction"] == r["base_prediction"] for r in rows)
    page = (out / "report.html").read_text()
    assert page.count('<tr class="unchanged">') == 6  # the same answers: nothing improved or regressed
    assert "<b>0</b> improved, <b>0</b> regressed, 6 unchanged" in page
    assert "data:image/png;base64," in page
    assert Path(out / "loss.png").exists() is False  # no training log given: no curve, and the page says so
    assert "no training log found" in page


def test_validate_without_image_folder_stops_before_loading_a_model(tmp_path, tiny_dir, capsys):
    from llava_cluster.cli import main

    assert main(["validate", "--model", str(tiny_dir.model), "--data", str(tiny_dir.val), "--out",
                 str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "--image-folder" in err and "sample" in err
    assert not (tmp_path / "v").exists()
