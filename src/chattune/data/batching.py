"""Micro-batch plans and collation: dynamic padding with length grouping, or packing.

Packing puts several conversations in one row. Each restarts its position ids at 0 and
sees only itself: the per-token losses equal those of the conversations run one by one
(tests/test_data_batching.py). Two layouts say "only itself" to the model:

- ``flat=True`` (the default for sdpa and flash-attention): the micro-batch's rows are
  concatenated into one row without padding, and ``cu_seq_lens_q``/``_k`` (the varlen
  kwargs of flash-attention) mark where each conversation starts; attention then runs
  per conversation (``chattune.models.attention``).
- ``flat=False``: rows padded to the longest, with a block-diagonal 4D mask, which
  every attention implementation, eager included, understands.

Mask convention, read from transformers 5.24 ``masking_utils``: a 4D ``attention_mask``
is passed to the attention kernel as-is. sdpa accepts a boolean or an additive float
mask, eager only an additive float mask (a boolean one is silently *added* as 0/1). So the
mask is float, 0 where a query may attend and the dtype's minimum where it may not, shape
(B, 1, T, T), in the dtype of the model's weights: float32 for float32 weights, autocast
included (on an H100, sdpa with bfloat16 weights and a float32 mask gave NaN or losses off
by 0.1). Relying on position ids alone is not enough: transformers only derives the packed
mask from them when no cache is built, and ``use_cache`` defaults to True.
"""

from __future__ import annotations

import bisect
import random

import torch

from chattune.data.render import IGNORE_INDEX


class MicroBatch(list):
    """Sample indices of one micro-batch. With packing, ``bins`` groups positions in this
    list into rows: ``bins=[[0, 1], [2]]`` packs the first two samples into row 0."""

    def __init__(self, indices: list[int], bins: list[list[int]] | None = None):
        super().__init__(indices)
        self.bins = bins


def batch_plan(lengths: list[int], batch_size: int, *, packing: bool, max_length: int, seed: int, epoch: int,
               shuffle: bool = True) -> list[MicroBatch]:
    """The micro-batches of one epoch, as sample indices; the same (seed, epoch) gives the same plan.

    Without packing, batches hold ``batch_size`` samples of similar length (sorted within
    chunks of ``50 * batch_size``), then the batches are shuffled. With packing, samples
    are packed best-fit-decreasing into rows of at most ``max_length`` tokens and a
    micro-batch holds ``batch_size`` rows; pass its ``.bins`` to ``collate``.

    Args:
        lengths: token count of every sample.
        batch_size: samples (or packed rows) per micro-batch.
        packing: pack several samples per row.
        max_length: row capacity when packing.
        seed: base seed of the order.
        epoch: epoch number, mixed into the seed so every epoch has its own order.
        shuffle: False gives a fixed length-sorted order (evaluation).

    Returns:
        A list of ``MicroBatch`` (each a list of sample indices).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if packing:
        rows = _pack(order, lengths, max_length)
        if shuffle:
            rng.shuffle(rows)
        groups = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        return [_with_bins(group) for group in groups]
    chunk = 50 * batch_size if shuffle else max(len(order), 1)
    batches = []
    for start in range(0, len(order), chunk):
        # stable sort: equal lengths keep the shuffled order
        part = sorted(order[start:start + chunk], key=lambda i: -lengths[i])
        batches += [MicroBatch(part[i:i + batch_size]) for i in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def _pack(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each sample goes to the fullest row that still has room."""
    too_long = [i for i in order if lengths[i] > capacity]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, more than the packing "
                         f"length {capacity}; tokenise with the same max_length")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row number), kept sorted
    for i in sorted(order, key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            room, row = capacity - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        bisect.insort(free, (room, row))
    return rows


def _with_bins(rows: list[list[int]]) -> MicroBatch:
    flat = [i for row in rows for i in row]
    bins, start = [], 0
    for row in rows:
        bins.append(list(range(start, start + len(row))))
        start += len(row)
    return MicroBatch(flat, bins)


def collate(samples: list[dict], pad_id: int, *, packing: bool, bins: list[list[int]] | None = None,
            mask_dtype: torch.dtype = torch.float32, flat: bool = False) -> dict:
    """Tensors for ``model(**batch)``; ``labels`` stay in the dict for the loss.

    Padding goes by position, never by token id, so an EOS label survives when pad == eos
    (the seed's bug).

    Args:
        samples: dicts with ``input_ids`` and ``labels``.
        pad_id: token id written into padding (its label is always ``IGNORE_INDEX``).
        packing: pack the samples into rows as ``bins`` says.
        bins: with packing, positions into ``samples`` per row (``MicroBatch.bins``).
        mask_dtype: dtype of the additive 4D mask when packing: the model weights' dtype.
        flat: with packing, one flat row and varlen kwargs instead of padded rows and a 4D mask.

    Returns:
        Not packing: ``input_ids``, ``attention_mask`` (B, T) and ``labels``. Packing:
        ``input_ids``, ``labels``, ``position_ids`` (B, T) and ``attention_mask`` (B, 1, T, T);
        flat: ``input_ids``, ``labels``, ``position_ids``, ``attention_mask`` (all ones) (1, N)
        and ``cu_seq_lens_q``/``_k`` (S + 1,), ``max_length_q``/``_k`` (ints).
    """
    if not packing:
        width = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[r, :n] = torch.tensor(s["input_ids"])
            labels[r, :n] = torch.tensor(s["labels"])
            mask[r, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if bins is None:
        raise ValueError("collate(packing=True) needs bins=micro_batch.bins from batch_plan")
    if flat:
        return _collate_flat([samples[j] for row in bins for j in row])
    return _collate_packed([[samples[j] for j in row] for row in bins], pad_id, mask_dtype)


def _collate_flat(samples: list[dict]) -> dict:
    ids = torch.tensor([t for s in samples for t in s["input_ids"]])[None]  # (1, N)
    labels = torch.tensor([t for s in samples for t in s["labels"]])[None]
    lengths = [len(s["input_ids"]) for s in samples]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    # An all-ones 2D mask (not None): transformers would otherwise rebuild a (N, N) block
    # mask from the position ids for sdpa, the work the varlen kwargs avoid.
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": torch.ones_like(ids),
            **varlen_kwargs(lengths)}


def varlen_kwargs(lengths: list[int]) -> dict:
    """flash-attention's varlen kwargs for a flat row of conversations of ``lengths`` tokens."""
    bounds = torch.tensor([0, *lengths]).cumsum(0, dtype=torch.int32)  # (S + 1,)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": max(lengths),
            "max_length_k": max(lengths)}


def _collate_packed(rows: list[list[dict]], pad_id: int, mask_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    width = max(sum(len(s["input_ids"]) for s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    positions = torch.zeros_like(ids)
    segment = torch.zeros_like(ids)  # which conversation each token belongs to
    for r, row in enumerate(rows):
        start = 0
        for k, s in enumerate(row):
            n = len(s["input_ids"])
            ids[r, start:start + n] = torch.tensor(s["input_ids"])
            labels[r, start:start + n] = torch.tensor(s["labels"])
            positions[r, start:start + n] = torch.arange(n)
            segment[r, start:start + n] = k
            start += n
        # Padding is one more segment attending to itself: no query row is fully masked
        # (a fully masked row turns into NaN in sdpa), and no real token sees padding. Its
        # positions stay 0: counted on, a short row beside a full one would number its
        # padding past the model's context (GPT-2's position table raises IndexError).
        segment[r, start:] = len(row)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    allowed = causal & (segment[:, :, None] == segment[:, None, :])  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(~allowed, torch.finfo(mask_dtype).min)
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}
