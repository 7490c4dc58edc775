"""The answer-scoring rule: exact match and token F1 after normalisation."""

from __future__ import annotations

import pytest

from llava_cluster.validate.scoring import exact_match, token_f1


def test_exact_match_normalises_case_punctuation_and_spaces():
    assert exact_match(" Red. ", "red") == 1.0
    assert exact_match("dark red", "red") == 0.0


def test_token_f1_counts_overlap():
    assert token_f1("a red circle", "red circle") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0
    assert token_f1("blue", "red") == 0.0
