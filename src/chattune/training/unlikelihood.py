"""Token-level unlikelihood training against repetition (Welleck et al. 2020, eq. 4).

At each answer position t the model is pushed away from the tokens it already wrote in
the same answer, except the token it should write now:

    L_UL(t) = - sum_{c in C_t} log(1 - p(c | x_<t)),   C_t = {answer tokens before t} - {target_t}

and ``train.unlikelihood_alpha`` weighs it against the next-token loss
(``L = L_MLE + alpha * L_UL`` per token; the paper fine-tunes with alpha 1). The candidates
are the earlier tokens of the same *answer* only: the prompt's words are the answer's to
reuse (the same reason the engine's repetition penalty skips prompt tokens), and earlier
answers of a conversation or other conversations packed into the row are left out.
An answer is a maximal run of loss-bearing positions in a row: prompts and padding carry
no loss, so they separate answers in every layout (padded, mask-packed, flat-packed).
EOS ends its answer, so it is never an earlier token of one: stopping is never penalised.

Written here because neither transformers, TRL nor PEFT ship an unlikelihood loss. The
candidates are taken per chunk of positions over their own answer's span, so the cost is
the answers' squared lengths, not the batch's; the log-sum-exp is taken with autograd
over the (N, V) answer logits in float32, chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 128  # positions per pass: (128, V) float32 logits and (128, answer span) candidates
MIN_COMPLEMENT = 1e-5  # 1 - p is clamped here, as in the paper's code


def answer_runs(keep: torch.Tensor) -> torch.Tensor:
    """(B, T) bool loss positions -> (N,) answer index of each True position, in row-major order."""
    prev = F.pad(keep[:, :-1], (1, 0), value=False)  # a run never continues across rows
    starts = (keep & ~prev).flatten()
    return starts.cumsum(0)[keep.flatten()] - 1


def first_occurrences(targets: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """(N,) bool: True where a target token appears for the first time in its answer."""
    key = runs.long() * (int(targets.max()) + 1 if targets.numel() else 1) + targets.long()
    sorted_key, order = torch.sort(key, stable=True)
    first_sorted = torch.ones_like(sorted_key, dtype=torch.bool)
    first_sorted[1:] = sorted_key[1:] != sorted_key[:-1]
    first = torch.empty_like(first_sorted)
    first[order] = first_sorted
    return first


def unlikelihood_sum(logits: torch.Tensor, targets: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """Summed L_UL over the N positions: ``logits`` (N, V), ``targets`` (N,), ``runs`` (N,) from
    :func:`answer_runs`. Float32 scalar, differentiable in ``logits``."""
    n = targets.shape[0]
    total = logits.new_zeros((), dtype=torch.float32)
    if n == 0:
        return total
    first = first_occurrences(targets, runs)
    pos = torch.arange(n, device=targets.device)
    run_start = torch.searchsorted(runs, runs)  # (N,) each position's answer's first position (runs ascend)
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        lo = int(run_start[a])  # earliest candidate any row of the chunk can have
        cols = torch.arange(lo, b, device=targets.device)
        cand = ((runs[lo:b][None] == runs[a:b, None]) & (cols[None] < pos[a:b, None]) & first[lo:b][None]
                & (targets[lo:b][None] != targets[a:b, None]))  # (b-a, b-lo)
        if not cand.any():
            continue
        rows = logits[a:b].float()  # (b-a, V)
        lse = torch.logsumexp(rows, dim=-1, keepdim=True)
        p = (rows.gather(1, targets[lo:b][None].expand(b - a, -1)) - lse).exp()  # (b-a, b-lo)
        total = total - (torch.log((1 - p).clamp_min(MIN_COMPLEMENT)) * cand).sum()
    return total
