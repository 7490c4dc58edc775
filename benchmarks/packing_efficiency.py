"""Real-token fraction per micro-batch: the anchor's modality-length grouping (pad to the longest
sample) vs our packed rows (pad only the row tails), on the same LLaVA-mix lengths. CPU only.

    .venv/bin/python benchmarks/packing_efficiency.py [--samples 200000] [--json out.json]

The length mix (`llava_mix`) follows the published composition of LLaVA-1.5's 665k instruction mix
(LLaVA-Instruct conversation/detail/reasoning, ShareGPT text-only, VQAv2, GQA, OKVQA, OCR-VQA,
A-OKVQA, TextCaps, RefCOCO, Visual Genome). Per source: its share of the mix, and a log-normal text
length (median, spread, clipped range) in Llama tokens including the vicuna_v1 system prompt and
role markers; image samples add 576 image tokens (CLIP ViT-L/14 at 336 px). The token figures are
estimates of each source's typical conversation (the short-answer VQA sources are stored as
multi-turn conversations of several questions per image), not counts from the data set itself.
Result: ~94% image samples of 620–2100 tokens (most 700–1000), ~6% text-only of 60–2048.

"Real-token fraction" = tokens of samples / tokens computed: each rank computes its micro-batch
padded to its longest row (or sample), and every rank of a micro-step takes as long as the slowest.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from collections.abc import Sequence

IMAGE_TOKENS = 576
# source: (samples in the 665k mix, has image, median text tokens, log-normal sigma, min, max)
LLAVA_MIX = {
    "llava_conversation": (58_000, True, 330, 0.45, 90, 1400),
    "llava_detail": (23_000, True, 230, 0.25, 120, 500),
    "llava_reasoning": (77_000, True, 260, 0.30, 120, 700),
    "sharegpt_text": (40_000, False, 800, 0.90, 60, 2048),
    "vqav2": (83_000, True, 170, 0.45, 60, 700),
    "gqa": (72_000, True, 230, 0.50, 60, 900),
    "okvqa": (9_000, True, 70, 0.25, 45, 150),
    "ocrvqa": (80_000, True, 160, 0.40, 60, 500),
    "aokvqa": (66_000, True, 110, 0.35, 50, 300),
    "textcaps": (22_000, True, 70, 0.25, 45, 160),
    "refcoco": (48_000, True, 300, 0.50, 80, 1000),
    "vg": (86_000, True, 280, 0.50, 80, 1000),
}


def llava_mix(n: int, seed: int = 0) -> tuple[list[int], list[bool]]:
    """`n` (length, is_image) draws from LLAVA_MIX, seeded."""
    rng = random.Random(seed)
    sources = list(LLAVA_MIX.values())
    picks = rng.choices(sources, weights=[s[0] for s in sources], k=n)
    lengths, is_image = [], []
    for _, image, median, sigma, lo, hi in picks:
        text = min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))
        lengths.append(min(2048, text + (IMAGE_TOKENS if image else 0)))
        is_image.append(image)
    return lengths, is_image


def anchor_order(lengths: Sequence[int], is_image: Sequence[bool], batch: int, world: int, seed: int) -> list[int]:
    """haotian-liu/LLaVA's modality-length grouping: per modality, shuffled mega-batches of
    batch × world samples sorted longest first and split into world balanced chunks; mega-batches
    of both modalities shuffled together."""
    rng = random.Random(seed)
    megas = []
    for flag in (True, False):
        idx = [i for i, img in enumerate(is_image) if img == flag]
        rng.shuffle(idx)
        for k in range(0, len(idx), batch * world):
            mega = sorted(idx[k:k + batch * world], key=lambda i: -lengths[i])
            chunks: list[list[int]] = [[] for _ in range(world)]
            totals = [0] * world
            for i in mega:
                r = min((r for r in range(world) if len(chunks[r]) < batch), key=lambda r: totals[r])
                chunks[r].append(i)
                totals[r] += lengths[i]
            megas.append([i for c in chunks for i in c])
    rng.shuffle(megas)
    return [i for m in megas for i in m]


def step_fractions(batches: Sequence[Sequence[int]], world: int) -> tuple[list[float], list[int]]:
    """Per micro-step (`world` consecutive per-rank micro-batches, each a list of row or sample
    token counts padded to its longest): real tokens / (world × the slowest rank's padded tokens),
    and the step's real tokens. Idle ranks waiting for the slowest count as waste, like padding."""
    fractions, real = [], []
    for k in range(0, len(batches), world):
        step = batches[k:k + world]
        slowest = max(len(mb) * max(mb) for mb in step)
        tokens = sum(sum(mb) for mb in step)
        fractions.append(tokens / (world * slowest))
        real.append(tokens)
    return fractions, real


def sample_batches(order: Sequence[int], lengths: Sequence[int], batch: int) -> list[list[int]]:
    return [[lengths[i] for i in order[k:k + batch]] for k in range(0, len(order), batch)]


def row_batches(rows: Sequence[Sequence[int]], lengths: Sequence[int], batch: int) -> list[list[int]]:
    sizes = [sum(lengths[i] for i in row) for row in rows]
    return [sizes[k:k + batch] for k in range(0, len(sizes), batch)]


def summary(batches: list[list[int]], world: int) -> dict[str, float]:
    fractions, real = step_fractions(batches, world)
    ordered = sorted(fractions)
    return {"real_fraction": sum(real) / sum(r / f for r, f in zip(real, fractions, strict=True)),
            "p5": ordered[int(0.05 * (len(ordered) - 1))], "min": ordered[0], "micro_steps": len(fractions)}


def measure(lengths: list[int], is_image: list[bool], samples_per_rank: int, world: int,
            pack_length: int, seed: int = 0) -> dict[str, object]:
    from llava_cluster.data.sampler import ModalityLengthGroupedSampler
    from llava_cluster.train.packing import PackedRowSampler

    rows_per_rank = max(1, round(samples_per_rank * statistics.mean(lengths) / pack_length))
    anchor = anchor_order(lengths, is_image, samples_per_rank, world, seed)
    grouped = ModalityLengthGroupedSampler(lengths, is_image, samples_per_rank, world, 1, seed=seed).order()
    rows = list(PackedRowSampler(lengths, pack_length, rows_per_rank, world, seed=seed))
    return {
        "samples_per_rank": samples_per_rank, "world": world, "pack_length": pack_length,
        "rows_per_rank": rows_per_rank, "samples": len(lengths), "packed_rows": len(rows),
        "anchor_grouping": summary(sample_batches(anchor, lengths, samples_per_rank), world),
        "our_grouping_unpacked": summary(sample_batches(grouped, lengths, samples_per_rank), world),
        "packed": summary(row_batches(rows, lengths, rows_per_rank), world),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    lengths, is_image = llava_mix(args.samples, args.seed)
    print(f"{args.samples} samples of the LLaVA-1.5 mix model: {sum(is_image) / len(is_image):.1%} with an image, "
          f"mean {statistics.mean(lengths):.0f} tokens, median {statistics.median(lengths):.0f}, max {max(lengths)}")
    print("real-token fraction: sample tokens / tokens computed, padding and ranks idling for the slowest "
          "included (all micro-steps; in brackets the 5th-percentile micro-step)\n")
    header = f"{'per rank x world':>17} {'pack len':>8} {'anchor grouping':>17} {'ours, unpacked':>16} " \
             f"{'ours, packed':>16} {'packed/anchor':>13}"
    print(header)
    results = []
    for per_rank, world, pack_length in [(16, 8, 2048), (16, 8, 4096), (16, 8, 8192), (4, 8, 4096), (1, 8, 8192)]:
        r = measure(lengths, is_image, per_rank, world, pack_length, args.seed)
        results.append(r)
        cells = [f"{r[k]['real_fraction']:>8.1%} ({r[k]['p5']:.1%})" for k in ("anchor_grouping", "our_grouping_unpacked",
                                                                       "packed")]
        ratio = r["packed"]["real_fraction"] / r["anchor_grouping"]["real_fraction"]
        print(f"{f'{per_rank} x {world}':>17} {pack_length:>8} {cells[0]:>17} {cells[1]:>16} {cells[2]:>16} "
              f"{ratio:>12.2f}x")
    print("\nanchor/ours unpacked: micro-batch = per-rank samples; packed: rows of <= pack len tokens, as many per "
          "rank as hold about the same tokens (anchor's per-rank samples x mean length)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"samples": args.samples, "seed": args.seed, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
