"""Batch plans and collation; packed rows give the same per-token losses as unpacked ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chattune.models import attention
from chattune.data import IGNORE_INDEX, DataConfig, batch_plan, collate, prepare
from conftest import build_model

LENGTHS = [5, 17, 3, 64, 33, 8, 8, 21, 40, 2, 12, 30, 7, 50, 1, 19]


@pytest.mark.parametrize("packing", [False, True])
def test_plan_is_deterministic_and_covers_every_sample_once(packing):
    plan = batch_plan(LENGTHS, 3, packing=packing, max_length=64, seed=1, epoch=0)
    assert plan == batch_plan(LENGTHS, 3, packing=packing, max_length=64, seed=1, epoch=0)
    assert sorted(i for mb in plan for i in mb) == list(range(len(LENGTHS)))
    other = batch_plan(LENGTHS, 3, packing=packing, max_length=64, seed=1, epoch=1)
    assert sorted(i for mb in other for i in mb) == list(range(len(LENGTHS))) and other != plan


def test_length_grouping():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    plan = batch_plan(lengths, 8, packing=False, max_length=512, seed=0, epoch=0)
    assert all(len(mb) <= 8 for mb in plan)
    padded = sum(8 * max(lengths[i] for i in mb) for mb in plan)
    assert padded < 1.2 * sum(lengths)  # grouped batches waste little on padding
    ordered = batch_plan(lengths, 8, packing=False, max_length=512, seed=0, epoch=0, shuffle=False)
    assert [i for mb in ordered for i in mb] == sorted(range(400), key=lambda i: -lengths[i])


def test_packing_respects_capacity_and_fills_rows():
    plan = batch_plan(LENGTHS, 2, packing=True, max_length=64, seed=0, epoch=0)
    rows = [[mb[j] for j in row] for mb in plan for row in mb.bins]
    assert all(sum(LENGTHS[i] for i in row) <= 64 for row in rows)
    assert all(len(mb.bins) <= 2 for mb in plan)
    assert len(rows) == -(-sum(LENGTHS) // 64)  # best-fit reaches the lower bound here
    with pytest.raises(ValueError, match="packing length"):
        batch_plan([70], 1, packing=True, max_length=64, seed=0, epoch=0)


def test_collate_pads_by_position():
    samples = [{"input_ids": [5, 0, 0], "labels": [IGNORE_INDEX, 0, 0]}, {"input_ids": [7], "labels": [IGNORE_INDEX]}]
    batch = collate(samples, 0, packing=False)
    assert batch["input_ids"].tolist() == [[5, 0, 0], [7, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 0, 0], [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_packed_layout():
    samples = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}, {"input_ids": [4, 5], "labels": [IGNORE_INDEX, 5]},
               {"input_ids": [6], "labels": [IGNORE_INDEX]}]
    batch = collate(samples, 0, packing=True, bins=[[0, 1], [2]])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]  # padding at 0
    allowed = (batch["attention_mask"][0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert batch["attention_mask"].shape == (2, 1, 5, 5)
    with pytest.raises(ValueError, match="bins"):
        collate(samples, 0, packing=True)


def test_packed_padding_never_numbers_past_the_longest_conversation():
    # a row of one short conversation beside a row as wide as a 256-position model: the
    # padding must not count to 255 (it did: IndexError in GPT-2's position table beyond)
    wide = [{"input_ids": [1] * 96, "labels": [IGNORE_INDEX] * 96} for _ in range(3)]
    short = {"input_ids": [2, 3], "labels": [IGNORE_INDEX, 3]}
    batch = collate(wide + [short], 0, packing=True, bins=[[0, 1, 2], [3]])
    assert batch["input_ids"].shape == (2, 288)
    assert int(batch["position_ids"].max()) == 95


def test_collate_flat_layout():
    samples = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}, {"input_ids": [4, 5], "labels": [IGNORE_INDEX, 5]},
               {"input_ids": [6], "labels": [IGNORE_INDEX]}]
    batch = collate(samples, 0, packing=True, bins=[[0, 1], [2]], flat=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]  # no padding
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 3, 5, 6]
    assert batch["max_length_q"] == batch["max_length_k"] == 3


def token_losses(model, batch) -> torch.Tensor:
    """Cross-entropy of every loss-bearing token, in row order."""
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits.float()
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses[targets != IGNORE_INDEX]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked(tiny_tokenizer, arch, attn):
    data = prepare(DataConfig(max_length=96), tiny_tokenizer)
    samples = data.splits["train"][:12]
    model = build_model(arch, len(tiny_tokenizer), attn)
    plan = batch_plan([len(s["input_ids"]) for s in samples], 3, packing=True, max_length=192, seed=0, epoch=0)
    mb = max(plan, key=lambda m: max(len(row) for row in m.bins))
    assert max(len(row) for row in mb.bins) >= 2  # several conversations share a row
    chosen = [samples[i] for i in mb]
    packed = token_losses(model, collate(chosen, tiny_tokenizer.pad_token_id, packing=True, bins=mb.bins))
    ordered = [chosen[j] for row in mb.bins for j in row]
    alone = torch.cat([token_losses(model, collate([s], tiny_tokenizer.pad_token_id, packing=False)) for s in ordered])
    padded = token_losses(model, collate(ordered, tiny_tokenizer.pad_token_id, packing=False))
    assert packed.shape == alone.shape == padded.shape
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_flat_packed_losses_and_gradients_equal_unpacked(tiny_tokenizer, arch):
    """One flat row with attention per conversation (chattune.models.attention) gives each
    conversation's own losses, and the same gradients as running them one by one."""
    data = prepare(DataConfig(max_length=96), tiny_tokenizer)
    samples = data.splits["train"][:12]
    model = build_model(arch, len(tiny_tokenizer), attention.NAME)
    plan = batch_plan([len(s["input_ids"]) for s in samples], 3, packing=True, max_length=192, seed=0, epoch=0)
    mb = max(plan, key=len)
    chosen = [samples[i] for i in mb]
    ordered = [chosen[j] for row in mb.bins for j in row]
    pad = tiny_tokenizer.pad_token_id

    def losses_and_grad(batches):
        model.zero_grad()
        losses = []
        for batch in batches:
            batch = dict(batch)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            step = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                                   reduction="none")
            losses.append(step[labels[:, 1:] != IGNORE_INDEX])
            step.sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return torch.cat(losses).detach(), grad

    flat_batch = collate(chosen, pad, packing=True, bins=mb.bins, flat=True)
    assert flat_batch["input_ids"].shape == (1, sum(len(s["input_ids"]) for s in chosen))
    assert len(flat_batch["cu_seq_lens_q"]) == len(chosen) + 1 >= 4
    flat, flat_grad = losses_and_grad([flat_batch])
    alone, alone_grad = losses_and_grad([collate([s], pad, packing=False) for s in ordered])
    torch.testing.assert_close(flat, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(flat_grad, alone_grad, atol=1e-5, rtol=1e-4)
    # without the varlen kwargs the same function is plain sdpa: the row is one sequence
    flat_batch.pop("cu_seq_lens_q")
    crossed, _ = losses_and_grad([flat_batch])
    assert not torch.allclose(crossed, alone, atol=1e-3)
