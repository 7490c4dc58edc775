"""The validation report's thumbnails go through the one image opener: nothing outside the folder, no hang."""

from __future__ import annotations

import base64
import io

from hostile_files import make_special_files, no_hang
from PIL import Image

from llava_cluster.validate.report import write_report


def test_thumbnails_only_of_contained_regular_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 0, 0)).save(images / "red.png")
    Image.new("RGB", (40, 30), (0, 200, 0)).save(tmp_path / "secret.png")
    special = sorted(make_special_files(images))
    names = ["red.png", "../secret.png", str(tmp_path / "secret.png"), *special]
    rows = [{"image": name, "prompt": "q", "reference": "r", "finetuned_prediction": "r",
             "finetuned_exact_match": 1.0} for name in names]
    metrics = {"samples": len(rows), "finetuned": {"exact_match": 1.0, "token_f1": 1.0, "eval_loss": 0.1}}
    with no_hang():
        page = write_report(tmp_path / "out", metrics, rows, images, None).read_text()
    thumbs = [part.split('"', 1)[0] for part in page.split('src="data:image/png;base64,')[1:]]
    assert len(thumbs) == 1  # red.png only: secret.png is outside, the rest are special files
    thumb = Image.open(io.BytesIO(base64.b64decode(thumbs[0])))
    assert thumb.getpixel((0, 0)) == (200, 0, 0)
    assert "outside the image folder" in page and "not a regular file" in page and "more than the limit" in page


def test_report_opens_with_the_paired_comparison_and_filters_to_regressions(tmp_path):
    from llava_cluster.validate.stats import compare, grouped

    samples = [{"conversations": [{"from": "human", "value": f"What colour {i}?"}, {"from": "gpt", "value": "red"}]}
               for i in range(4)]
    base = {"exact_match": [1.0, 0.0, 0.0, 1.0], "token_f1": [1.0, 0.0, 0.5, 1.0]}
    tuned = {"exact_match": [0.0, 1.0, 0.0, 1.0], "token_f1": [0.0, 1.0, 0.8, 1.0]}
    rows = [{"image": None, "prompt": "q", "reference": "red", "base_prediction": "b", "finetuned_prediction": "f",
             **{f"base_{m}": v[i] for m, v in base.items()}, **{f"finetuned_{m}": v[i] for m, v in tuned.items()}}
            for i in range(4)]
    metrics = {"samples": 4, "base": {"exact_match": 0.5, "token_f1": 0.625, "eval_loss": 1.0},
               "finetuned": {"exact_match": 0.5, "token_f1": 0.7, "eval_loss": 0.5},
               "comparison": compare(base, tuned), "groups": grouped(samples, {"base": base, "finetuned": tuned}),
               "provenance": {"git_commit": "abc123", "libraries": {"torch": "2.13.0"}}}
    page = write_report(tmp_path / "out", metrics, rows, None, None).read_text()
    assert page.index("Fine-tune vs base") < page.index("<h2>Scores")
    assert "<b>2</b> improved, <b>1</b> regressed, 1 unchanged" in page, page[:3000]
    assert [page.count(f'<tr class="{k}">') for k in ("improved", "regressed", "unchanged")] == [2, 1, 1]
    assert "show('regressed')" in page and "function show(kind)" in page
    assert "<details><summary>Provenance" in page and "abc123" in page


def test_report_shows_lmms_eval_numbers_or_why_there_are_none(tmp_path):
    metrics = {"samples": 1, "finetuned": {"exact_match": 1.0, "token_f1": 1.0, "eval_loss": 0.1}}
    rows = [{"image": None, "prompt": "q", "reference": "r", "finetuned_prediction": "r", "finetuned_exact_match": 1.0}]
    metrics["lmms_eval"] = {
        "status": "ok", "lmms_eval_version": "0.7.3", "model": "llava_hf", "limit": 50,
        "results": str(tmp_path / "validate" / "lmms_eval" / "results.json"),
        "tasks": {"mme": {"samples": 50, "metrics": {
            "mme_perception_score": {"value": 1234.5, "stderr": None, "higher_is_better": True},
            "exact_match": {"value": 0.6667, "stderr": 0.0673, "higher_is_better": True}}}}}
    page = write_report(tmp_path / "ok", metrics, rows, None, None).read_text()
    assert page.index("<h2>Scores") < page.index("<h2>lmms-eval</h2>") < page.index("<h2>Samples")
    assert "lmms-eval 0.7.3, model llava_hf, at most 50 documents per task" in page
    assert f"<code>{tmp_path / 'validate' / 'lmms_eval'}</code>" in page
    assert "<td>mme</td><td>mme_perception_score ↑</td><td>1234</td><td>–</td><td>50</td>" in page
    assert "<td>mme</td><td>exact_match ↑</td><td>0.6667</td><td>0.0673</td><td>50</td>" in page
    metrics["lmms_eval"] = {"status": "skipped", "reason": "lmms-eval is not installed for /env/bin/python: <install>"}
    page = write_report(tmp_path / "skipped", metrics, rows, None, None).read_text()
    assert '<p class="warn">lmms-eval skipped: lmms-eval is not installed for /env/bin/python: &lt;install&gt;</p>' in page
    del metrics["lmms_eval"]
    assert "lmms-eval" not in write_report(tmp_path / "none", metrics, rows, None, None).read_text()
