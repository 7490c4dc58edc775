"""Multimodal sequence packing: several samples per row, each still seeing only itself.

Why: LLaVA samples are 600–2100 tokens (one 576-token image + text). Padding a micro-batch to its
longest sample wastes a fifth of the compute even after length grouping; packing rows close to full
wastes almost none (benchmarks/packing_efficiency.py).

Exactness. A packed row is the samples laid end to end, padded at its tail by a pad segment. Each
segment's `position_ids` restart at 0, and the collator passes no `attention_mask`: transformers
(masking_utils.find_packed_sequence_indices) then reads segment boundaries from the position
resets and builds a block-diagonal causal mask (sdpa, eager, flex_attention), and RoPE sees each
sample's own positions. The first label of each segment is -100, so the last token of one sample
never learns to predict the first of the next: per-token loss terms, and the supervised-token count
the HF Trainer divides by (labels[..., 1:] != -100), are those of the unpacked batch. LLaVA scatters
image features into image-token slots in row-major order, so `pixel_values` holds every image of the
micro-batch in row order and a row may hold several images (any-resolution: with `image_sizes`, tiles
padded per batch, `collator.image_batch`).

Layout of an epoch (`PackedRowSampler`): shuffle (seed, epoch), cut into windows, best-fit
decreasing into rows of at most `capacity` estimated tokens, shuffle rows; then, as in the
modality-length sampler, sort each window of `window_steps` micro-steps' rows by tokens and cut it
into micro-steps (rows of one micro-batch are padded to the longest, ranks wait for the slowest),
deal each micro-step's rows to ranks in a snake (equal row counts, balanced tokens), shuffle steps. The sampler yields rows
(tuples of dataset indices); `PackedDataset` fetches a row's items; `PackedCollator` packs them.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import Sampler

from llava_cluster.data.collator import image_batch
from llava_cluster.data.encode import IGNORE_INDEX
from llava_cluster.data.sampler import WINDOW_STEPS, snake_deal

WINDOW_SAMPLES = 4096
CALIBRATION_SAMPLES = 512


def calibrated_lengths(dataset: Any, samples: int = CALIBRATION_SAMPLES) -> list[int]:
    """The dataset's length estimates rescaled to its tokenizer, capped at its max_length.

    `dataset.lengths` guesses text tokens from characters (4 per token), which is fine for ranking
    but not for filling rows: a tokenizer at 2.5 chars/token would overfill every row by half. The
    text part is scaled by actual/estimated text tokens of a seeded subset (the same on every
    rank); image tokens are exact already (per image, from its size, for any-resolution families).
    """
    from llava_cluster.data.encode import encode_sample

    own_image = list(dataset.image_counts)
    picks = random.Random(0).sample(range(len(dataset)), min(samples, len(dataset)))
    estimated = actual = 0
    for i in picks:
        enc = encode_sample(dataset.record(i), dataset.processor.tokenizer, dataset.template, own_image[i], None)
        estimated += dataset.lengths[i] - own_image[i]
        actual += enc.full_length - own_image[i]
    scale = actual / max(estimated, 1)
    cap = dataset.max_length or math.inf
    return [int(min(cap, own_image[i] + math.ceil((n - own_image[i]) * scale)))
            for i, n in enumerate(dataset.lengths)]


def best_fit_decreasing(indices: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of `indices` whose lengths sum to <= capacity (a longer sample gets a row of its own).

    Longest first, each into the open row it fills most tightly: the first-fit-decreasing family's
    packing quality in O(n log n) (a sorted list of remaining capacities) instead of O(n * rows).
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row number), sorted
    for index in sorted(indices, key=lambda i: (-lengths[i], i)):
        need = lengths[index]
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            room, row = free.pop(k)
            rows[row].append(index)
            bisect.insort(free, (room - need, row))
        else:
            rows.append([index])
            if need < capacity:
                bisect.insort(free, (capacity - need, len(rows) - 1))
    return rows


def split_to_multiple(rows: list[list[int]], lengths: Sequence[int], multiple: int) -> list[list[int]]:
    """Move single samples out of the fullest multi-sample rows into rows of their own until the
    row count divides by `multiple` (rows per micro-step), so no rank is handed a repeated row."""
    rows = [list(r) for r in rows]
    while len(rows) % multiple:
        donors = [k for k, r in enumerate(rows) if len(r) > 1]
        if not donors:
            break
        k = max(donors, key=lambda j: (len(rows[j]), sum(lengths[i] for i in rows[j])))
        shortest = min(rows[k], key=lambda i: (lengths[i], i))
        rows[k].remove(shortest)
        rows.append([shortest])
    return rows


class PackedRowSampler(Sampler[tuple[int, ...]]):
    """Yields every dataset index exactly once per epoch, grouped into rows (tuples of indices).

    Consumed like any sampler by the HF Trainer: `batch_size` consecutive rows form one rank's
    micro-batch and micro-steps of `batch_size * world_size` rows are dealt round-robin to ranks.
    The order is a function of (seed, epoch) only, so every rank computes the same without talking.
    """

    def __init__(self, lengths: Sequence[int], capacity: int, batch_size: int, world_size: int = 1,
                 seed: int = 0, window: int = WINDOW_SAMPLES, window_steps: int = WINDOW_STEPS) -> None:
        if min(capacity, batch_size, world_size, window, window_steps) < 1:
            raise ValueError("capacity, batch_size, world_size, window and window_steps must be >= 1")
        self.lengths = list(lengths)
        self.capacity = capacity
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.window = window
        self.window_steps = window_steps
        self.epoch = 0
        self._cache: tuple[int, list[tuple[int, ...]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rows(self) -> list[tuple[int, ...]]:
        """This epoch's rows in yield order (cached per epoch: planning 665k samples takes ~1 s)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._plan())
        return self._cache[1]

    def _tokens(self, row: Sequence[int]) -> int:
        return sum(self.lengths[i] for i in row)

    def _plan(self) -> list[tuple[int, ...]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        rows: list[list[int]] = []
        for start in range(0, len(order), self.window):
            rows += best_fit_decreasing(order[start:start + self.window], self.lengths, self.capacity)
        m = self.batch_size * self.world_size
        rows = split_to_multiple(rows, self.lengths, m)
        rng.shuffle(rows)
        steps = []
        for start in range(0, len(rows), m * self.window_steps):
            ordered = sorted(rows[start:start + m * self.window_steps], key=lambda r: (-self._tokens(r), r))
            for k in range(0, len(ordered), m):
                step = ordered[k:k + m]
                if len(step) == m:
                    dealt = snake_deal(list(range(m)), self.world_size)
                    step = [step[j] for rank in dealt for j in rank]
                steps.append(step)
        rng.shuffle(steps)
        if steps:  # the heaviest micro-step first: an out-of-memory shows in the first minute
            heaviest = max(range(len(steps)), key=lambda k: max(self._tokens(r) for r in steps[k]))
            steps.insert(0, steps.pop(heaviest))
        return [tuple(row) for step in steps for row in step]

    def __len__(self) -> int:
        return len(self.rows())

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(self.rows())


class PackedDataset:
    """A dataset whose items are rows: `dataset[(i, j, k)]` -> [dataset[i], dataset[j], dataset[k]].

    An int index still returns the plain item, so evaluation can use the same dataset and collator.
    `lengths` (default: the dataset's) are what the sampler packs by.
    """

    def __init__(self, dataset: Any, lengths: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.lengths = list(dataset.lengths if lengths is None else lengths)
        self.is_image = dataset.is_image
        self.image_seq_length = dataset.image_seq_length
        self.blank_image_item = dataset.blank_image_item

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int | Sequence[int]) -> Any:
        if isinstance(row, int):
            return self.dataset[row]
        return [self.dataset[i] for i in row]


class PackedCollator:
    """Rows of items -> {input_ids, labels, position_ids, pixel_values?}, no attention_mask.

    Accepts a list of rows (each a list of dataset items) or a list of plain items (one per row, as
    in evaluation). Rows are padded to the longest with a pad segment of its own (positions from 0,
    labels -100), so padding neither attends to nor is attended by any sample.
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int = 1) -> None:
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; LLaVA processors define one (<pad>)")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[Any]) -> dict[str, Any]:
        import torch

        rows = [row if isinstance(row, list) else [row] for row in rows]
        sizes = [sum(len(item["input_ids"]) for item in row) for row in rows]
        m = self.pad_to_multiple_of
        width = -(-max(sizes) // m) * m
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for item in row:
                n = len(item["input_ids"])
                input_ids[r, at:at + n] = item["input_ids"]
                labels[r, at + 1:at + n] = item["labels"][1:]
                position_ids[r, at:at + n] = torch.arange(n)
                at += n
            position_ids[r, at:] = torch.arange(width - at)
        images = image_batch([item for row in rows for item in row])
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, **images}

