"""Forward passes without gradients over many batches: validation, the reference pass,
the eval's reference-answer loss and the held-out pair rankings all go through ``passes``,
so batches reach the device and the run's autocast the same way everywhere (and as in the
training step, ``autocast``).

Also the two per-sample measurements those passes take: the answer-token loss of SFT
samples (``loss_on_samples``) and the summed answer log-probs of preference pairs
(``pair_logps``, per answer segment ``segment_logps``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from chattune.data import IGNORE_INDEX, collate
from chattune.training.loss import shift_targets, token_losses

EXTRA_KEYS = ("segment_ids", "pairs", "ref_logps", "ties", "desirable", "mismatched")  # batch entries the model must not see


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``, those of nested batches (KTO's mismatched answers) too."""
    return {k: v.to(device) if torch.is_tensor(v) else to_device(v, device) if isinstance(v, dict) else v
            for k, v in batch.items()}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The run's autocast: ``dtype`` (bf16) where the run trains in it, else off."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def passes(model, batches: Iterable[dict], device: torch.device, dtype: torch.dtype | None,
           fn: Callable[[Any, dict], Any]) -> Iterator[Any]:
    """``fn(model, batch)`` for each batch, in eval mode, on ``device``, under the run's
    autocast and without gradients."""
    model.eval()
    for batch in batches:
        batch = to_device(batch, device)
        with torch.no_grad(), autocast(device, dtype):
            yield fn(model, batch)


def pair_logps(model, batch: dict, full_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs (P, 2) float32 (chosen, rejected) and answer lengths (P, 2)."""
    logps, lengths = segment_logps(model, batch, 2 * batch["pairs"], full_logits)
    return logps.view(-1, 2), lengths.view(-1, 2)


def segment_logps(model, batch: dict, n: int, full_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs (n,) float32 of the batch's ``n`` segments (``segment_ids``
    0..n-1) and their answer lengths (n,)."""
    inputs = {k: v for k, v in batch.items() if k not in EXTRA_KEYS}
    targets = shift_targets(inputs["labels"])  # (B, T)
    ce, keep = token_losses(model, inputs, targets, full_logits)  # (N,), (B, T)
    # Position t predicts t + 1; a segment's first label is always ignored, so the target of a
    # kept position lies in the position's own segment.
    seg = batch["segment_ids"][keep]  # (N,)
    zeros = torch.zeros(n, dtype=torch.float32, device=ce.device)
    logps = zeros.index_add(0, seg, -ce.float())
    lengths = zeros.index_add(0, seg, torch.ones_like(ce, dtype=torch.float32))
    return logps, lengths


def _answer_and_all_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token losses at every real token but the first (N,), which of them are answer
    tokens (N,), and the row of each (N,)."""
    # all-token targets: every real token but the first, as the seed measured (prompt included)
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    ids[:, 0] = IGNORE_INDEX
    # one forward for both: answer positions are a subset of the all-token positions
    losses, keep = token_losses(model, batch, shift_targets(ids))  # (N,), (B, T)
    answer = (shift_targets(batch["labels"]) != IGNORE_INDEX)[keep]  # (N,)
    return losses, answer, keep.nonzero()[:, 0]


def loss_on_samples(model, samples: list[dict], pad_id: int, batch_size: int, device, dtype=None) -> dict:
    """Mean CE and perplexity over answer tokens (``loss``) and over all tokens (``all_loss``);
    ``per_sample``: each sample's summed answer-token loss and its token count, in order."""
    sums = {"loss": 0.0, "n": 0, "all_loss": 0.0, "all_n": 0}
    per_sample = [[0.0, 0] for _ in samples]
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))  # less padding
    chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    batches = (collate([samples[i] for i in chunk], pad_id, packing=False) for chunk in chunks)
    for chunk, (losses, answer, rows) in zip(chunks, passes(model, batches, device, dtype, _answer_and_all_losses)):
        rows = rows[answer]  # (n,) the sample of each answer token
        row_sums = torch.zeros(len(chunk), device=losses.device).index_add_(0, rows, losses[answer].float())
        row_counts = torch.bincount(rows, minlength=len(chunk))
        for j, i in enumerate(chunk):
            per_sample[i] = [float(row_sums[j]), int(row_counts[j])]
        sums["loss"] += float(losses[answer].sum())
        sums["n"] += int(answer.sum())
        sums["all_loss"] += float(losses.sum())
        sums["all_n"] += len(losses)
    out = {"loss": sums["loss"] / max(sums["n"], 1), "all_loss": sums["all_loss"] / max(sums["all_n"], 1),
           "loss_tokens": sums["n"], "all_tokens": sums["all_n"]}
    out["ppl"] = math.exp(min(out["loss"], 50))
    out["all_ppl"] = math.exp(min(out["all_loss"], 50))
    out["per_sample"] = per_sample
    return out
