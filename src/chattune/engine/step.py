"""What one decode step feeds the model, from its lane's rows and their drafts.

One token a row with every row ending at the cache's end: (B, 1) ids, and for sdpa models
with padding, attention in runs of rows (``attention.plan_runs``), or for eager and flash
attention a padding mask. Otherwise (rows check drafts, or end apart): N flat tokens, one
a batch row, ``[last, *draft]`` of each row in order, written where each row ends
(``cache.Writes``) and attended each up to its own position (``attention.Plan``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chattune.models import attention
from chattune.engine import cache as kv
from chattune.engine.lane import Row


@dataclass
class StepInputs:
    ids: torch.Tensor  # (N, 1)
    positions: torch.Tensor  # (N, 1)
    owners: list[int]  # the row of each token
    firsts: list[int]  # each row's first token
    flat: bool  # N flat tokens written where each row ends (``writes``)
    mask: torch.Tensor | None = None  # (B, L + 1) padding mask (eager and flash attention)
    writes: kv.Writes | None = None
    extra: dict = field(default_factory=dict)  # kv_plan, for segment_attention


def step_inputs(rows: list[Row], drafts: list[list[int]], width: int, ours: bool, device) -> StepInputs:
    """The inputs of a step over ``rows`` (a lane of cache ``width``), row i feeding its last
    token and ``drafts[i]``; ``ours``: the model attends through ``segment_attention``."""
    counts = [1 + len(d) for d in drafts]  # tokens each row feeds
    owners = [i for i, c in enumerate(counts) for _ in range(c)]
    firsts = [owners.index(i) for i in range(len(rows))]
    if len(owners) == len(rows) and not any(r.lag for r in rows):  # one token a row, all ending at the end
        step = StepInputs(torch.tensor([[r.last] for r in rows], device=device),
                          torch.tensor([[r.length] for r in rows], device=device), owners, firsts, False)
        starts = [width - r.length for r in rows]
        if ours and any(starts):  # attend in runs of rows, each over its own positions
            step.extra["kv_plan"] = attention.plan_runs(starts, [width + 1] * len(rows), device)
        elif any(starts):
            step.mask = (torch.arange(width + 1, device=device)[None, :] >= torch.tensor(starts, device=device)[:, None]).long()
        return step
    offsets = [k - firsts[i] for k, i in enumerate(owners)]  # each token's place in its row's feed
    ids = [[rows[i].last if j == 0 else drafts[i][j - 1]] for i, j in zip(owners, offsets)]
    step = StepInputs(torch.tensor(ids, device=device),
                      torch.tensor([[rows[i].length + j] for i, j in zip(owners, offsets)], device=device),
                      owners, firsts, True)
    step.writes = kv.Writes(torch.tensor(owners, device=device),
                            torch.tensor([j - rows[i].lag for i, j in zip(owners, offsets)], device=device),
                            max(c - r.lag for r, c in zip(rows, counts)))
    step.extra["kv_plan"] = attention.plan_runs([width - r.lag - r.length for r in rows],
                                                [width - r.lag + c for r, c in zip(rows, counts)], device, counts)
    return step
