"""Modality- and length-grouped order of a whole epoch, the same on every rank.

How the order is consumed (HF Trainer + accelerate): the flat order is cut into per-device batches of
`batch_size` dealt round-robin to ranks, so a micro-step is `batch_size * world_size` consecutive
indices (rank r gets the r-th `batch_size` of them) and an optimizer step is `grad_accum` micro-steps.

Why group by modality: Hugging Face LLaVA skips the vision tower for a text-only batch. If one rank
runs it and another does not, their collectives differ (ZeRO-3 parameter gathers, gradient reduction
of the projector) and the job hangs or corrupts. So every optimizer step is image-only or text-only.
Why group by length: samples in a micro-batch are padded to the longest, and every rank waits for the
slowest. Each window of `window_steps` steps of one modality is sorted by length and cut into steps,
so a step holds similar lengths; each micro-step is dealt to ranks in a snake (0..W-1, W-1..0, ...)
so per-rank token totals stay balanced. Step order is then shuffled, and the step holding the longest
sample goes first so that an out-of-memory shows in the first minute, not hours in.

Leftovers: each modality's last `len % step_size` samples (fewer than one step) go to the end of the
epoch, images then text, so every index appears exactly once. The final one or two steps are thus the
only ones that may hold both modalities; in their boundary micro-step the images are dealt one per
rank first, so each rank still gets an image whenever there are at least `world_size` of them.
Deterministic from (seed, epoch): every rank computes the same order without communicating.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

WINDOW_STEPS = 16


def snake_deal(indices: list[int], world_size: int) -> list[list[int]]:
    """Deal length-sorted indices to ranks 0..W-1, W-1..0, ...: balanced totals, equal counts."""
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for j, index in enumerate(indices):
        turn, pos = divmod(j, world_size)
        ranks[pos if turn % 2 == 0 else world_size - 1 - pos].append(index)
    return ranks


class ModalityLengthGroupedSampler(Sampler[int]):
    """Yields every index once per epoch; see the module docstring for the layout."""

    def __init__(self, lengths: Sequence[int], is_image: Sequence[bool], batch_size: int, world_size: int = 1,
                 grad_accum: int = 1, seed: int = 0, window_steps: int = WINDOW_STEPS) -> None:
        if len(lengths) != len(is_image):
            raise ValueError(f"{len(lengths)} lengths but {len(is_image)} modality flags")
        if min(batch_size, world_size, grad_accum, window_steps) < 1:
            raise ValueError("batch_size, world_size, grad_accum and window_steps must be >= 1")
        self.lengths = list(lengths)
        self.is_image = [bool(x) for x in is_image]
        self.batch_size = batch_size
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.window_steps = window_steps
        self.epoch = 0

    @property
    def micro_step_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def step_size(self) -> int:
        return self.micro_step_size * self.grad_accum

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def _by_length(self, indices: list[int]) -> list[int]:
        return sorted(indices, key=lambda i: -self.lengths[i])

    def _micro_step(self, indices: list[int]) -> list[int]:
        """One micro-step's flat order: rank r's batch at [r*B, (r+1)*B)."""
        if len(indices) < self.micro_step_size:
            return indices
        return [i for rank in snake_deal(self._by_length(indices), self.world_size) for i in rank]

    def _steps(self, indices: list[int]) -> list[list[int]]:
        """Full steps of one modality (already shuffled), length-grouped window by window."""
        full = len(indices) - len(indices) % self.step_size
        window = self.window_steps * self.step_size
        steps = []
        for start in range(0, full, window):
            ordered = self._by_length(indices[start:min(start + window, full)])
            for s in range(0, len(ordered), self.step_size):
                chunk = ordered[s:s + self.step_size]
                m = self.micro_step_size
                steps.append([i for k in range(0, len(chunk), m) for i in self._micro_step(chunk[k:k + m])])
        return steps

    def _tail(self, images: list[int], texts: list[int]) -> list[int]:
        """Leftovers (< one step per modality), micro-step aligned, images spread over ranks at the boundary."""
        m, b = self.micro_step_size, self.batch_size
        images, texts = self._by_length(images), self._by_length(texts)
        whole = len(images) - len(images) % m
        out = [i for k in range(0, whole, m) for i in self._micro_step(images[k:k + m])]
        rest, texts = images[whole:], list(texts)
        if rest:
            fill = texts[: m - len(rest)]
            texts = texts[len(fill):]
            if len(rest) + len(fill) < m:  # the epoch's last, partial micro-step: nothing to deal
                return out + rest + fill
            slots: list[list[int]] = [[] for _ in range(self.world_size)]
            for j, index in enumerate(rest + fill):  # images first: one per rank before any rank gets two
                rank = j % self.world_size if j < len(rest) else None
                if rank is None or len(slots[rank]) >= b:
                    rank = next(r for r in range(self.world_size) if len(slots[r]) < b)
                slots[rank].append(index)
            out += [i for rank in slots for i in rank]
        out += [i for k in range(0, len(texts), m) for i in self._micro_step(texts[k:k + m])]
        return out

    def order(self) -> list[int]:
        """The flat order of this epoch (a function of seed and epoch only)."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        images = [i for i, img in enumerate(self.is_image) if img]
        texts = [i for i, img in enumerate(self.is_image) if not img]
        rng.shuffle(images)
        rng.shuffle(texts)
        steps = self._steps(images) + self._steps(texts)
        rng.shuffle(steps)
        if steps:
            longest = max(range(len(steps)), key=lambda k: max(self.lengths[i] for i in steps[k]))
            steps.insert(0, steps.pop(longest))
        n = self.step_size
        return [i for step in steps for i in step] + self._tail(images[len(images) - len(images) % n:],
                                                                 texts[len(texts) - len(texts) % n:])
