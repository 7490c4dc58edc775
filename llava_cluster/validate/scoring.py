"""How an answer is scored against its reference: one rule for exact match and token F1, used for the
model, the base and each checkpoint, and the text that says so in the provenance."""

from __future__ import annotations

import re
import string
from collections import Counter


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


SCORING = ("exact_match: prediction and reference equal after lower-casing, removing punctuation and "
           "collapsing whitespace; token_f1: F1 of the normalised words; eval_loss: mean cross-entropy of the "
           "reference reply's tokens, teacher-forced")


def sample_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-sample scores, the input of the means and of the paired statistics."""
    return {"exact_match": list(map(exact_match, predictions, references)),
            "token_f1": list(map(token_f1, predictions, references))}


def mean_scores(scores: dict[str, list[float]]) -> dict[str, float]:
    """Each metric's mean over the samples."""
    return {metric: sum(values) / max(len(values), 1) for metric, values in scores.items()}
