"""Is the fine-tune's gain real? Paired statistics of base vs fine-tune on the same held-out samples.

A single number per model (73% vs 0% on 60 samples) hides how sure it is and what got worse. Both
models answer the same samples, so the comparison is paired:

  delta + 95% CI   of each metric's mean, from a seeded paired bootstrap (resample samples, keep
                   each sample's two scores together); the percentile interval
  McNemar          exact two-sided test for exact match on the discordant pairs (only one model
                   right): b = base right & fine-tune wrong, c = the reverse; p = P(min(b, c) or
                   fewer of b + c fair coin flips, either side)
  changes          improved / regressed / unchanged samples: by exact match, then by token F1 where
                   exact match is equal (a closer answer counts)
  groups           the same metrics per category (a `category` field of the record, else the first
                   words of the question) and for image vs text-only samples
"""

from __future__ import annotations

import math
from typing import Any

RESAMPLES = 10_000
LEVEL = 0.95
GROUP_WORDS = 2  # a question's first words name its group when the record has no category
MIN_GROUP = 2  # smaller groups are folded into "other"


def paired_bootstrap(base: list[float], tuned: list[float], seed: int = 0, resamples: int = RESAMPLES,
                     level: float = LEVEL) -> dict[str, float]:
    """Mean of tuned − base with a percentile interval from resampling the pairs."""
    import numpy as np

    if len(base) != len(tuned) or not base:
        raise ValueError("paired_bootstrap needs two equally long, non-empty score lists")
    diff = np.asarray(tuned, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[picks].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"delta": float(diff.mean()), "ci_low": float(low), "ci_high": float(high), "level": level,
            "resamples": resamples, "seed": seed}


def mcnemar_exact(base_right: list[bool], tuned_right: list[bool]) -> dict[str, float]:
    """Exact McNemar test on paired correctness."""
    b = sum(1 for x, y in zip(base_right, tuned_right, strict=True) if x and not y)
    c = sum(1 for x, y in zip(base_right, tuned_right, strict=True) if y and not x)
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n if n else 1.0
    return {"base_only": b, "finetuned_only": c, "p_value": min(1.0, 2 * tail)}


ORDER = ("exact_match", "token_f1")  # a sample improved or regressed by the first of these that changed


def change_of(base: dict[str, float], tuned: dict[str, float]) -> str:
    """improved | regressed | unchanged for one sample, by exact match, then by token F1."""
    for metric in ORDER:
        if metric in base and metric in tuned and tuned[metric] != base[metric]:
            return "improved" if tuned[metric] > base[metric] else "regressed"
    return "unchanged"


def changes(base: dict[str, list[float]], tuned: dict[str, list[float]]) -> dict[str, int]:
    counts = {"improved": 0, "regressed": 0, "unchanged": 0}
    for i in range(len(tuned["exact_match"])):
        counts[change_of({m: v[i] for m, v in base.items()}, {m: v[i] for m, v in tuned.items()})] += 1
    return counts


def group_of(sample: dict[str, Any]) -> str:
    """The record's `category`, else the first words of its last question, lower-cased."""
    if isinstance(sample.get("category"), str) and sample["category"].strip():
        return sample["category"].strip()
    question = str(sample["conversations"][-2]["value"]).replace("<image>", " ")
    words = [w.strip("?.,!:;").lower() for w in question.split()]
    return " ".join(w for w in words[:GROUP_WORDS] if w) or "(empty)"


def _means(scores: dict[str, dict[str, list[float]]], rows: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"samples": len(rows)}
    for label, metrics in scores.items():
        out[label] = {m: sum(values[i] for i in rows) / len(rows) for m, values in metrics.items()}
    return out


def grouped(samples: list[dict[str, Any]], scores: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per-group means of every model's metrics: by category / question start, and by modality."""
    by_group: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_group.setdefault(group_of(sample), []).append(i)
    small = [i for rows in by_group.values() if len(rows) < MIN_GROUP for i in rows]
    by_group = {g: rows for g, rows in by_group.items() if len(rows) >= MIN_GROUP}
    if small:
        by_group["other"] = by_group.get("other", []) + small
    modality: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        modality.setdefault("image" if sample.get("image") else "text-only", []).append(i)
    return {"category": {g: _means(scores, rows) for g, rows in sorted(by_group.items())},
            "modality": {g: _means(scores, rows) for g, rows in sorted(modality.items())}}


def compare(base: dict[str, list[float]], tuned: dict[str, list[float]], seed: int = 0) -> dict[str, Any]:
    """The paired comparison of per-sample scores {metric: [score per sample]} of two models."""
    out: dict[str, Any] = {m: paired_bootstrap(base[m], tuned[m], seed=seed) for m in tuned}
    out["mcnemar_exact_match"] = mcnemar_exact([s == 1.0 for s in base["exact_match"]],
                                               [s == 1.0 for s in tuned["exact_match"]])
    out["changes"] = changes(base, tuned)
    return out
