"""Modality-length grouped sampler: invariants of the flat order the Trainer/accelerate cut into steps."""

from __future__ import annotations

import random

import pytest

from llava_cluster.data.sampler import ModalityLengthGroupedSampler, snake_deal

SHAPES = [  # (samples, image fraction, batch_size, world_size, grad_accum)
    (1000, 0.7, 4, 2, 2),
    (1000, 0.7, 1, 1, 1),
    (997, 0.3, 2, 4, 3),
    (37, 0.5, 5, 3, 1),
    (5, 0.5, 2, 4, 3),
    (640, 1.0, 4, 2, 2),
    (333, 0.0, 3, 2, 2),
]


def make(n: int, image_fraction: float, seed: int = 0) -> tuple[list[int], list[bool]]:
    rng = random.Random(seed)
    return [rng.randint(20, 2000) for _ in range(n)], [rng.random() < image_fraction for _ in range(n)]


def chunks(order: list[int], size: int) -> list[list[int]]:
    return [order[k:k + size] for k in range(0, len(order), size)]


@pytest.mark.parametrize("n, frac, b, w, a", SHAPES)
def test_every_index_exactly_once_and_one_modality_per_step(n, frac, b, w, a):
    lengths, is_image = make(n, frac)
    sampler = ModalityLengthGroupedSampler(lengths, is_image, b, w, a, seed=7)
    order = list(sampler)
    assert len(sampler) == n
    assert sorted(order) == list(range(n))
    steps = chunks(order, b * w * a)
    mixed = [k for k, step in enumerate(steps) if len({is_image[i] for i in step}) > 1]
    n_img = sum(is_image)
    full_steps = n_img // (b * w * a) + (n - n_img) // (b * w * a)
    # Only the leftovers at the end of the epoch (< one step per modality) may share a step.
    assert all(k >= full_steps for k in mixed)
    assert len(mixed) <= 2
    if frac in (0.0, 1.0):
        assert mixed == []


@pytest.mark.parametrize("n, frac, b, w, a", SHAPES[:3])
def test_same_order_on_every_rank_and_new_order_each_epoch(n, frac, b, w, a):
    lengths, is_image = make(n, frac)
    ranks = [ModalityLengthGroupedSampler(lengths, is_image, b, w, a, seed=3) for _ in range(w)]
    assert all(list(r) == list(ranks[0]) for r in ranks)
    first = list(ranks[0])
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != first and sorted(ranks[0]) == sorted(first)
    other_seed = ModalityLengthGroupedSampler(lengths, is_image, b, w, a, seed=4)
    assert list(other_seed) != first


def test_micro_steps_balanced_across_ranks_and_longest_first():
    lengths, is_image = make(4096, 0.6, seed=1)
    b, w, a = 4, 4, 2
    order = ModalityLengthGroupedSampler(lengths, is_image, b, w, a, seed=0).order()
    micro = chunks(order, b * w)
    for step in micro[: (len(order) // (b * w * a)) * a - 2]:  # full micro-steps before the tail
        totals = [sum(lengths[i] for i in rank) for rank in chunks(step, b)]
        assert max(totals) - min(totals) <= max(lengths[i] for i in step) - min(lengths[i] for i in step)
    assert max(lengths[i] for i in order[: b * w * a]) == max(lengths)


def test_length_grouping_cuts_padding_against_a_random_order():
    lengths, is_image = make(8192, 0.6, seed=2)
    b, w, a = 4, 2, 2

    def padded(order):  # tokens a rank computes: batch size x longest sample of its micro-batch
        return sum(len(batch) * max(lengths[i] for i in batch) for batch in chunks(order, b))

    grouped = padded(ModalityLengthGroupedSampler(lengths, is_image, b, w, a, seed=0).order())
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    assert grouped < 0.7 * padded(shuffled)
    assert grouped >= sum(lengths)


def test_boundary_micro_step_gives_every_rank_an_image():
    b, w = 2, 4  # micro-step 8; 12 images = one full step + 4 left over; 7 texts all left over
    lengths = list(range(100, 119))
    is_image = [True] * 12 + [False] * 7
    order = ModalityLengthGroupedSampler(lengths, is_image, b, w, 1, seed=0).order()
    boundary = order[8:16]
    assert sum(is_image[i] for i in boundary) == 4
    assert all(any(is_image[i] for i in rank) for rank in chunks(boundary, b))
    assert not any(is_image[i] for i in order[16:])


def test_snake_deal_balances_sorted_lengths():
    assert snake_deal([9, 8, 7, 6, 5, 4], 3) == [[9, 4], [8, 5], [7, 6]]


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="3 lengths but 2"):
        ModalityLengthGroupedSampler([1, 2, 3], [True, False], 1)
    with pytest.raises(ValueError, match=">= 1"):
        ModalityLengthGroupedSampler([1], [True], 0)
