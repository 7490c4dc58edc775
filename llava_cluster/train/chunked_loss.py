"""Causal-LM cross-entropy without the full logits tensor: only supervised positions, a chunk at a time.

The usual loss materialises `lm_head(hidden)` for every position (batch x length x 32k vocabulary),
then an fp32 copy, then its gradient: for 16 x 2048 tokens that is ~12 GiB, most of it for image and
prompt positions whose labels are ignored. Here the positions whose shifted label is supervised are
gathered first, and their logits are computed `chunk` rows at a time inside an activation checkpoint,
so at most one chunk of logits exists, in forward and in backward (where it is recomputed).

The output head is frozen in every recipe here (LoRA targets the decoder's projections), so only the
gradient with respect to the hidden states is needed and the head's weight enters as a plain tensor.
Under ZeRO-3 that weight is partitioned: `head_weight` gathers it once per loss, on every rank alike
(a per-chunk gather would be a collective whose count differs between ranks), and holds a copy for
the recomputation in backward. The value and the gradients are those of transformers'
`ForCausalLMLoss`: the sum over supervised tokens divided by `num_items_in_batch`, or their mean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024  # rows of logits at a time: 1024 x 32k vocabulary ~ 128 MiB in fp32


@contextlib.contextmanager
def head_weight(head: torch.nn.Linear) -> Iterator[torch.Tensor]:
    """The frozen output head's full weight; gathered (and copied) under ZeRO-3."""
    if head.weight.requires_grad or getattr(head, "bias", None) is not None:
        raise ValueError("the chunked loss needs a frozen, bias-free output head (lm_head)")
    if hasattr(head.weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None):
            weight = head.weight.detach().clone()
        yield weight
    else:
        yield head.weight.detach()


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           num_items_in_batch: torch.Tensor | int | None = None,
                           chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Loss of `hidden @ weightᵀ` against `labels` (B, L), shifted here as the HF loss does."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    keep = shifted != IGNORE_INDEX
    rows, targets = hidden[keep], shifted[keep]
    total = (hidden.flatten()[:1] * 0).sum().float()  # zero, but part of the graph when nothing is supervised
    for start in range(0, rows.shape[0], chunk):
        total = total + checkpoint(_chunk_loss_sum, rows[start:start + chunk], weight,
                                   targets[start:start + chunk], use_reentrant=False)
    if num_items_in_batch is None:
        return total / max(int(targets.numel()), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
