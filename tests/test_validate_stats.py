"""Paired statistics of base vs fine-tune: seeded bootstrap intervals, exact McNemar, changes, groups."""

from __future__ import annotations

import numpy as np
import pytest

from llava_cluster.validate.stats import changes, compare, group_of, grouped, mcnemar_exact, paired_bootstrap


def test_bootstrap_is_seeded_and_reproducible():
    base, tuned = [0.0, 1.0, 0.0, 1.0, 0.0] * 4, [1.0, 1.0, 0.0, 1.0, 1.0] * 4
    first = paired_bootstrap(base, tuned, seed=3)
    assert first == paired_bootstrap(base, tuned, seed=3)
    assert first != paired_bootstrap(base, tuned, seed=4)
    assert first["delta"] == pytest.approx(0.4)
    assert first["ci_low"] < 0.4 < first["ci_high"]


def test_bootstrap_interval_covers_a_known_difference():
    """Synthetic paired scores with a true mean gain of 0.3: the 95% interval holds 0.3, not 0."""
    rng = np.random.default_rng(0)
    base = rng.normal(0.4, 0.2, 300)
    tuned = base + 0.3 + rng.normal(0, 0.25, 300)
    result = paired_bootstrap(list(base), list(tuned), seed=0)
    assert result["ci_low"] < 0.3 < result["ci_high"]
    assert result["ci_low"] > 0
    assert result["ci_high"] - result["ci_low"] < 0.1  # about 4 standard errors of 0.25/sqrt(300)


def test_no_difference_gives_an_interval_around_zero():
    scores = [1.0, 0.0, 1.0, 1.0]
    result = paired_bootstrap(scores, scores)
    assert (result["delta"], result["ci_low"], result["ci_high"]) == (0.0, 0.0, 0.0)


def test_mcnemar_matches_a_hand_computed_case():
    """b=1, c=6: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128 = 0.125."""
    base = [True] * 1 + [False] * 6 + [True] * 3 + [False] * 2
    tuned = [False] * 1 + [True] * 6 + [True] * 3 + [False] * 2
    assert mcnemar_exact(base, tuned) == {"base_only": 1, "finetuned_only": 6, "p_value": 0.125}
    assert mcnemar_exact([True, False], [False, True])["p_value"] == 1.0
    assert mcnemar_exact([True, True], [True, True]) == {"base_only": 0, "finetuned_only": 0, "p_value": 1.0}


def test_changes_go_by_exact_match_then_token_f1():
    base = {"exact_match": [0, 1, 1, 0, 0], "token_f1": [0, 1, 1, 0.5, 0.5]}
    tuned = {"exact_match": [1, 0, 1, 0, 0], "token_f1": [1, 0, 1, 0.7, 0.2]}
    assert changes(base, tuned) == {"improved": 2, "regressed": 2, "unchanged": 1}


def sample(question: str, image: str | None = None, **extra):
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "x"}],
            **({"image": image} if image else {}), **extra}


def test_groups_by_category_field_else_question_start_and_by_modality():
    samples = [sample("<image>\nWhat colour is it?", "a.png"), sample("What colour is the sky?"),
               sample("How many dots?", "b.png", category="counting"), sample("Count them", category="counting"),
               sample("Why?")]
    assert group_of(samples[0]) == "what colour" and group_of(samples[2]) == "counting"
    scores = {"base": {"exact_match": [0, 0, 1, 0, 1]}, "finetuned": {"exact_match": [1, 1, 1, 0, 0]}}
    groups = grouped(samples, scores)
    assert set(groups["category"]) == {"what colour", "counting", "other"}
    assert groups["category"]["what colour"] == {"samples": 2, "base": {"exact_match": 0.0},
                                                 "finetuned": {"exact_match": 1.0}}
    assert groups["category"]["other"]["samples"] == 1
    assert groups["modality"]["image"]["samples"] == 2
    assert groups["modality"]["text-only"]["finetuned"]["exact_match"] == pytest.approx(1 / 3)


def test_compare_puts_it_together():
    base = {"exact_match": [0.0, 0.0, 1.0, 0.0], "token_f1": [0.2, 0.0, 1.0, 0.5]}
    tuned = {"exact_match": [1.0, 1.0, 0.0, 0.0], "token_f1": [1.0, 1.0, 0.4, 0.5]}
    result = compare(base, tuned)
    assert result["exact_match"]["delta"] == pytest.approx(0.25)
    assert result["mcnemar_exact_match"]["finetuned_only"] == 2
    assert result["changes"] == {"improved": 2, "regressed": 1, "unchanged": 1}
