"""Packing is exact and its sampler keeps the epoch invariants.

Exactness on the tiny LLaVA (fp32, CPU): each sample's per-token losses inside a packed row equal
its unpacked losses, and the gradients of LoRA and projector from a packed batch equal those from the
same samples padded one per row. Then one 2-rank ZeRO-3 run with packing through `stage train`.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from llava_cluster.data.collator import LlavaCollator
from llava_cluster.train.packing import (
    PackedCollator,
    PackedDataset,
    PackedRowSampler,
    best_fit_decreasing,
    calibrated_lengths,
    split_to_multiple,
)


def llava_mix(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [(576 if rng.random() < 0.9 else 0) + rng.randint(40, 1400) for _ in range(n)]


# --- planning ---------------------------------------------------------------------------------------

def test_best_fit_decreasing_respects_capacity_and_packs_tightly():
    lengths = llava_mix(3000)
    rows = best_fit_decreasing(range(3000), lengths, 4096)
    assert sorted(i for r in rows for i in r) == list(range(3000))
    assert all(sum(lengths[i] for i in r) <= 4096 for r in rows)
    lower_bound = -(-sum(lengths) // 4096)
    assert len(rows) <= lower_bound * 1.04


def test_oversized_sample_gets_a_row_of_its_own():
    rows = best_fit_decreasing([0, 1, 2], [5000, 100, 200], 4096)
    assert [0] in rows and sorted(i for r in rows for i in r) == [0, 1, 2]


def test_split_to_multiple_makes_row_count_divisible_keeping_every_index():
    lengths = [10] * 7
    rows = split_to_multiple([[0, 1, 2], [3, 4], [5, 6]], lengths, 4)
    assert len(rows) == 4 and sorted(i for r in rows for i in r) == list(range(7))


@pytest.mark.parametrize("world,batch", [(1, 1), (2, 2), (4, 1), (3, 2)])
def test_sampler_yields_every_index_once_and_is_identical_on_every_rank(world, batch):
    lengths = llava_mix(2000, seed=world)
    a = PackedRowSampler(lengths, 4096, batch_size=batch, world_size=world, seed=3, window=512)
    b = PackedRowSampler(lengths, 4096, batch_size=batch, world_size=world, seed=3, window=512)
    rows = list(a)
    assert rows == list(b)
    assert Counter(i for r in rows for i in r) == Counter(range(2000))
    assert len(rows) == len(a) and len(rows) % (batch * world) == 0
    assert all(sum(lengths[i] for i in r) <= 4096 for r in rows)
    fill = sum(lengths) / (4096 * len(rows))
    assert fill > 0.95, fill


def test_epochs_and_seeds_change_the_order_but_not_the_invariants():
    lengths = llava_mix(1000)
    s = PackedRowSampler(lengths, 2048, batch_size=2, world_size=2, seed=0)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert first != second
    assert sorted(i for r in second for i in r) == list(range(1000))
    assert list(PackedRowSampler(lengths, 2048, batch_size=2, world_size=2, seed=1)) != first


def test_ranks_get_balanced_tokens_and_compute_is_almost_all_real_tokens():
    """Rows of one micro-batch are padded to the longest and ranks wait for the slowest: the
    fraction of computed tokens that are real stays >= 97% (the issue's goal) on a LLaVA-like mix."""
    lengths = llava_mix(4000, seed=5)
    world, batch = 4, 2
    rows = list(PackedRowSampler(lengths, 4096, batch_size=batch, world_size=world, seed=0))
    m = world * batch
    tokens = [sum(lengths[i] for i in r) for r in rows]
    spread, computed = [], 0
    for k in range(0, len(rows), m):
        per_rank = [tokens[k + r * batch:k + (r + 1) * batch] for r in range(world)]
        spread.append(max(map(sum, per_rank)) - min(map(sum, per_rank)))
        computed += world * max(batch * max(mb) for mb in per_rank)
    assert sum(spread) / len(spread) < 200
    assert sum(tokens) / computed > 0.97
    assert max(tokens[:m]) == max(tokens)  # the heaviest micro-step first


# --- collation --------------------------------------------------------------------------------------

def item(ids: list[int], labels: list[int], image: float | None = None) -> dict:
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if image is not None:
        out["pixel_values"] = torch.full((3, 2, 2), image)
    return out


def test_collator_restarts_positions_masks_boundaries_and_keeps_images_in_row_order():
    rows = [[item([1, 2, 3], [-100, 2, 3], image=1.0), item([4, 5], [4, 5], image=2.0)],
            [item([6], [-100]), item([7, 8, 9], [-100, 8, 9], image=3.0)]]
    batch = PackedCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9, -100]]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    padded = PackedCollator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert padded["input_ids"].shape == (2, 8) and padded["position_ids"][0, 5:].tolist() == [0, 1, 2]
    assert padded["position_ids"][1, 4:].tolist() == [0, 1, 2, 3]


def test_collator_accepts_plain_items_as_one_row_each():
    batch = PackedCollator(pad_token_id=0)([item([1, 2], [-100, 2]), item([3], [-100])])
    assert batch["position_ids"].tolist() == [[0, 1], [0, 0]] and "pixel_values" not in batch


def test_image_in_every_batch_adds_the_blank_image_as_a_segment_of_the_shortest_row():
    from llava_cluster.train.trainer import ImageInEveryBatch

    blank = {"input_ids": torch.tensor([9, 9]), "labels": torch.tensor([-100, -100]), "pixel_values": torch.zeros(3, 2, 2)}
    wrap = ImageInEveryBatch(PackedCollator(pad_token_id=0), blank)
    batch = wrap([[item([1, 2, 3], [-100, 2, 3])], [item([4], [-100])]])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert batch["labels"][1].tolist() == [-100, -100, -100] and batch["pixel_values"].shape == (1, 3, 2, 2)


# --- exactness on the tiny model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_setup(tiny_dir, tmp_path_factory):
    """The product's model (train/model_setup.build_model, fp32, LoRA with B made non-zero) + dataset."""
    from llava_cluster.data.dataset import LazySupervisedDataset
    from llava_cluster.data.templates import get_template
    from llava_cluster.model.load import load_processor
    from llava_cluster.spec import RunSpec
    from llava_cluster.train.model_setup import build_model

    spec = RunSpec.model_validate({
        "name": "pack", "storage": str(tmp_path_factory.mktemp("s")),
        "model": {"base": str(tiny_dir.model)}, "data": {"train": str(tiny_dir.train), "max_length": 256},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "training": {"precision": "fp32"},
    })
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.train()
    processor = load_processor(tiny_dir.model)
    ds = LazySupervisedDataset(tiny_dir.train, tiny_dir.images, processor, get_template("vicuna_v1"), 256)
    return model, processor, ds


def token_losses(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return losses.view(labels.shape)


def pick(ds, n_image: int, n_text: int) -> list[dict]:
    images = [i for i, f in enumerate(ds.is_image) if f][:n_image]
    texts = [i for i, f in enumerate(ds.is_image) if not f][:n_text]
    assert len(images) == n_image and len(texts) == n_text
    return [ds[i] for i in (images[:2] + texts[:1] + images[2:] + texts[1:])]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_per_sample_losses_equal_unpacked(tiny_setup, attn):
    model, processor, ds = tiny_setup
    model.base_model.model.set_attn_implementation(attn)
    items = pick(ds, n_image=4, n_text=2)
    rows = [items[:3], items[3:]]
    pad = processor.tokenizer.pad_token_id
    packed = PackedCollator(pad)(rows)
    assert packed["pixel_values"].shape[0] == 4
    with torch.no_grad():
        packed_losses = token_losses(model, packed)
        for r, row in enumerate(rows):
            at = 0
            for it in row:
                n = len(it["input_ids"])
                alone = token_losses(model, LlavaCollator(pad)([it]))[0]
                assert alone.abs().sum() > 0
                torch.testing.assert_close(packed_losses[r, at:at + n - 1], alone, rtol=1e-5, atol=1e-5)
                at += n
            assert packed_losses[r, at - 1:].abs().sum() == 0  # nothing predicts into or inside the padding


def test_packed_gradients_equal_unpacked(tiny_setup):
    """Same loss normalisation as the HF Trainer (sum over supervised tokens / their count)."""
    model, processor, ds = tiny_setup
    model.base_model.model.set_attn_implementation("sdpa")
    items = pick(ds, n_image=3, n_text=2)
    pad = processor.tokenizer.pad_token_id
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("multi_modal_projector" in n for n in trainable)

    def grads(batch) -> tuple[dict[str, torch.Tensor], float]:
        model.zero_grad()
        count = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**batch, num_items_in_batch=count).loss
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in trainable.items()}, float(loss.detach())

    unpacked, loss_u = grads(LlavaCollator(pad)(items))
    packed, loss_p = grads(PackedCollator(pad)([items[:2], items[2:]]))
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    for name in trainable:
        torch.testing.assert_close(packed[name], unpacked[name], rtol=1e-4, atol=1e-5, msg=name)
    assert max(g.abs().max() for g in packed.values()) > 1e-3


def test_calibrated_lengths_track_real_token_counts(tiny_setup):
    _, _, ds = tiny_setup
    lengths = calibrated_lengths(ds, samples=64)
    real = [len(ds[i]["input_ids"]) for i in range(0, len(ds), 8)]
    ours = [lengths[i] for i in range(0, len(ds), 8)]
    raw = [ds.lengths[i] for i in range(0, len(ds), 8)]
    assert abs(sum(ours) / sum(real) - 1) < 0.05
    assert abs(sum(raw) / sum(real) - 1) > abs(sum(ours) / sum(real) - 1)
    packed = PackedDataset(ds, lengths)
    assert packed.lengths == lengths and len(packed) == len(ds)
    assert [len(it["input_ids"]) for it in packed[(0, 1)]] == [len(ds[i]["input_ids"]) for i in (0, 1)]


# --- a real distributed run ---------------------------------------------------------------------------

@pytest.mark.slow
def test_zero3_two_ranks_train_with_packing(tmp_path, tiny_dir):
    from test_train import assert_complete_save, freeze, stage, write_spec

    from llava_cluster.rundir import RunDir

    run = RunDir(freeze(write_spec(tmp_path, tiny_dir, "packed-z3", training__packing=True,
                                   training__pack_length=160, optim__max_steps=3, training__save_steps=3)))
    proc = stage("train", run.root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert_complete_save(run.final_dir)
    packed = re.search(r"packing: (\d+) samples into (\d+) rows", proc.stderr)
    assert packed and int(packed[2]) < int(packed[1]) / 2, proc.stderr[-2000:]
    logged = (run.logs_dir / "train_metrics.jsonl").read_text().splitlines()
    metrics = [line for line in logged if '"loss"' in line]
    assert len(metrics) == 3
