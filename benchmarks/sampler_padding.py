"""Padding waste and rank imbalance of the modality-length sampler, side by side with two baselines.

Baselines: a plain shuffle, and the original LLaVA grouping (per modality, random mega-batches of
batch x world samples sorted by length and dealt greedily to ranks). Cost model: a rank's micro-batch
costs batch_size x its longest sample (padding), and a micro-step costs its slowest rank.

    .venv/bin/python benchmarks/sampler_padding.py [--samples 200000]
"""

from __future__ import annotations

import argparse
import random

from packing_efficiency import anchor_order  # the original LLaVA grouping, shared by the benchmarks

from llava_cluster.data.sampler import ModalityLengthGroupedSampler


def synthetic(n: int, seed: int) -> tuple[list[int], list[bool]]:
    """LLaVA-mix-like: ~90% image samples (576 image tokens + 40..1400 text), text-only 30..1800."""
    rng = random.Random(seed)
    is_image = [rng.random() < 0.9 for _ in range(n)]
    lengths = [576 + int(rng.lognormvariate(4.8, 0.8)) % 1400 if img else 30 + int(rng.lognormvariate(5.5, 0.9)) % 1800
               for img in is_image]
    return lengths, is_image


def cost(order: list[int], lengths: list[int], b: int, w: int) -> tuple[float, float]:
    """(useful tokens / padded compute of the slowest rank per micro-step, mean rank imbalance)."""
    spent, useful, imbalance, steps = 0, sum(lengths), 0.0, 0
    for k in range(0, len(order), b * w):
        step = order[k:k + b * w]
        per_rank = [b * max(lengths[i] for i in step[r:r + b]) for r in range(0, len(step), b)]
        spent += max(per_rank) * w
        imbalance += max(per_rank) / (sum(per_rank) / len(per_rank))
        steps += 1
    return useful / spent, imbalance / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200_000)
    args = parser.parse_args()
    lengths, is_image = synthetic(args.samples, 0)
    print(f"{args.samples} samples; efficiency = real tokens / tokens computed (incl. padding and idle ranks)")
    print(f"{'batch x world x accum':>22} {'shuffle':>16} {'llava-style':>16} {'this sampler':>16}")
    for b, w, a in [(16, 8, 1), (4, 8, 4), (16, 16, 1), (1, 8, 16)]:
        shuffled = list(range(len(lengths)))
        random.Random(0).shuffle(shuffled)
        ours = ModalityLengthGroupedSampler(lengths, is_image, b, w, a, seed=0).order()
        row = [cost(o, lengths, b, w) for o in (shuffled, anchor_order(lengths, is_image, b, w, 0), ours)]
        print(f"{f'{b} x {w} x {a}':>22} " + " ".join(f"{eff:>9.1%} (imb {imb:.2f})" for eff, imb in row))


if __name__ == "__main__":
    main()
