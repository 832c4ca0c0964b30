"""Attention over packed rows, one conversation at a time.

A packed batch is one flat row of conversations with no padding (padding-free packing, as
flash-attention's varlen kernels take it): ``cu_seq_lens_q`` holds where each conversation
starts, ``position_ids`` restart at 0 in each. With flash-attention (CUDA) transformers
reads those kwargs natively. torch's sdpa has no varlen kernel, and a block-diagonal T x T
mask makes its CPU kernel compute every masked-out block too: with four conversations a
row, ~8x the attention work of causal attention per conversation, and a (T, T) mask in
memory (benchmarks/profile_step.py measures its share of a LoRA step). So this module registers an
attention function, ``chattune_sdpa``, with transformers' ``AttentionInterface``: given
``cu_seq_lens_q`` it runs causal sdpa on each conversation's slice of the row (a short
Python loop per layer; its kernel skips the upper triangle), otherwise it is transformers'
own sdpa (generation, padded batches). Its mask function is sdpa's, so everything but
packed training is unchanged.

The decoding engine's steps (one query token per row) run through the same function
(``decode_steps``), for two reasons:
- Grouped-query attention without copies. transformers' sdpa path repeats every key and
  value head to the query heads (``repeat_kv``) whenever there is a mask, i.e. on every
  padded batch: a copy of the whole cache per layer per step. Here a row's H query heads
  are read as H/Hkv queries against each of its Hkv key heads (flash-attention's
  "pack GQA"), one sdpa over the cache as it is.
- Ragged steps: the rows share a cache left-padded to the longest row, and one masked
  sdpa reads and scores every padded position of every row. One 2,500-token Arena-Hard
  prompt among 31 short ones makes each step read ~31 x 2,500 padded positions of keys
  and values in every layer. Given ``kv_plan`` (``plan_runs``: the rows cut into
  contiguous runs, each with the earliest first and latest last real position of its
  rows; rows end apart once some keep drafts), attention runs one sdpa per run over that
  run's positions only, masking what padding is left. One call per row would skip all
  padding, but a call costs its overhead, and one row alone gives torch's CPU kernel only
  its Hkv heads to share among the cores (3 heads on 2 cores leave one core idle part of
  the time; benchmarks/decode_rows.py --ragged); ``plan_runs`` weighs the padding a run reads against the
  calls it saves.
- Drafts checked in the batch: a row may feed several tokens (its next and the ones it
  guesses, ``engine/lookup.py``). The step's tokens are then a flat batch of one token
  per batch row (the linear layers see N tokens and no padding). A run whose rows feed
  several gathers them into a (rows, T) grid, T queries after a row's H/Hkv query heads,
  each masked to attend up to its own position; runs of rows that feed one token each
  read theirs as they lie, so a drafting row does not make every row pay for T queries.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "chattune_sdpa"
# plan_runs' costs, in row-positions (the time one row spends on one cache position in a
# batched call, ~70-100 ns here): a call's own overhead (slicing, dispatch), and the factor
# for a row alone. Fitted on one sdpa call at 1-32 rows and 64-2,048 positions
# (benchmarks/decode_rows.py --ragged shows the whole steps).
CALL_COST = 250
ALONE_COST = 1.35
QUERY_COST = 0.25  # each further query token of a row, against its first


@dataclass
class Run:
    """Rows ``first:end`` of a decode step, attending the step's key positions
    ``start:stop``. Each row feeds up to ``tokens`` queries: the flat tokens
    ``gather`` (rows * tokens,) in a (rows, tokens) grid (a row's last where it has fewer),
    or with one a row, the flat tokens ``flat_first:flat_first + rows``. ``keep`` (n, 1,
    tokens, stop - start) is True where a query may attend (its row's real positions up to
    its own), None when every query may attend all."""

    first: int
    end: int
    start: int
    stop: int
    keep: torch.Tensor | None
    tokens: int = 1
    flat_first: int = 0
    gather: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict, repr=False)

    def mask(self, dtype: torch.dtype, groups: int) -> torch.Tensor | None:
        """``keep`` as an additive mask for queries packed as (Hkv, groups x tokens), made
        once for all layers: sdpa would turn a boolean mask into one at every call."""
        if self.keep is None:
            return None
        if dtype not in self._masks:
            keep = self.keep
            if keep.shape[2] > 1:  # the groups' queries of token t: rows g * tokens + t
                n, _, t, width = keep.shape
                keep = keep[:, :, None].expand(n, 1, groups, t, width).reshape(n, 1, groups * t, width)
            self._masks[dtype] = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
        return self._masks[dtype]


@dataclass
class Plan:
    """A decode step's attention: its runs of rows, and where runs feed several tokens a row
    (checked drafts), ``scatter`` (N,): the place of each flat token among the runs' cells."""

    runs: list[Run]
    scatter: torch.Tensor | None = None


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      cu_seq_lens_q: torch.Tensor | None = None, kv_plan: Plan | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """sdpa per conversation of a flat packed row; for a decode step (one query token a
    batch row), per run of rows with ``kv_plan`` or grouped-query over the shared cache;
    transformers' sdpa otherwise."""
    if query.shape[2] == 1:
        if kv_plan is not None:
            return _runs_decode(query, key, value, kv_plan, scaling)
        if attention_mask is None or attention_mask.shape[1] == 1:  # a mask shared by the heads
            return _decode(query, key, value, attention_mask, scaling)
    if cu_seq_lens_q is None or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError(f"packed attention wants one flat row and no cache; got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (1, H, N, D)
    bounds = cu_seq_lens_q.tolist()
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q {bounds[0]}..{bounds[-1]} does not cover the row of {query.shape[2]} tokens")
    dtype = value.dtype  # under autocast RoPE leaves query and key in float32, value in bfloat16
    if query.device.type == "cpu":
        # torch's CPU flash kernel, forward + backward, runs float32 faster than bfloat16 at
        # the 100-300 tokens most conversations have (benchmarks/step_kernels.py), and float32 is
        # the more exact of the two.
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast(query.device.type, enabled=False):
        parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                                dropout_p=dropout, scale=scaling)  # (1, H, n, D)
                 for a, b in zip(bounds, bounds[1:]) if b > a]
    out = torch.cat(parts, dim=2).to(dtype)  # (1, H, N, D)
    return out.transpose(1, 2).contiguous(), None  # (1, N, H, D), as transformers' kernels return


def _decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
            scaling: float | None) -> tuple[torch.Tensor, None]:
    """One query token per row, H query heads as (Hkv, H/Hkv) queries: no repeat_kv."""
    b, h, _, d = query.shape  # (B, H, 1, D); key, value (B, Hkv, L, D); mask (B, 1, 1, L) or None
    hkv = key.shape[1]
    out = F.scaled_dot_product_attention(query.view(b, hkv, h // hkv, d), key, value, attn_mask=mask, scale=scaling)
    return out.view(b, h, 1, d).transpose(1, 2).contiguous(), None  # (B, 1, H, D)


def plan_runs(starts: list[int], ends: list[int], device: torch.device | str = "cpu",
              tokens: list[int] | None = None) -> Plan:
    """Cut a decode step's rows (in cache order) into contiguous runs of least cost. Row i's
    real key positions are ``starts[i]:ends[i]`` (its step's tokens included); with
    ``tokens``, its last ``tokens[i]`` positions are its queries, flat in row order, each
    attending up to its own. A run reads every row's positions from the run's earliest
    start to its latest end, for as many queries a row as its widest row feeds (each
    further one at ``QUERY_COST``), plus ``CALL_COST``; a row alone costs ``ALONE_COST``
    times its positions. Dynamic programming over where runs end, O(rows^2)."""
    n = len(starts)
    tokens = tokens or [1] * n
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        low, high, wide = float("inf"), 0, 1
        for first in range(end - 1, -1, -1):
            low, high, wide = min(low, starts[first]), max(high, ends[first]), max(wide, tokens[first])
            rows = end - first
            cost = best[first] + CALL_COST + rows * (high - low) * (ALONE_COST if rows == 1 else 1.0) * (
                1 + QUERY_COST * (wide - 1))
            if cost < best[end]:
                best[end], cut[end] = cost, first
    bounds, end = [], n
    while end:
        bounds.append((cut[end], end))
        end = cut[end]
    flat = [0]  # each row's first flat token
    for t in tokens[:-1]:
        flat.append(flat[-1] + t)
    runs, cells, scatter = [], 0, [0] * sum(tokens)
    for first, end in reversed(bounds):
        lo, hi, own = starts[first:end], ends[first:end], tokens[first:end]
        start, stop, width, keep, gather = min(lo), max(hi), max(own), None, None
        if width > 1:
            gather = torch.tensor([flat[i] + min(j, tokens[i] - 1) for i in range(first, end) for j in range(width)],
                                  device=device)
        for i in range(first, end):
            for j in range(tokens[i]):
                scatter[flat[i] + j] = cells + (i - first) * width + j
        cells += (end - first) * width
        if max(lo) > start or min(hi) < stop or width > 1:
            col = torch.arange(start, stop, device=device)  # (L,)
            hi_t = torch.tensor(hi, device=device)[:, None]  # (n, 1)
            last = hi_t - torch.tensor(own, device=device)[:, None] + torch.arange(width, device=device)[None, :]
            last = torch.minimum(last, hi_t - 1)  # (n, T) each query's own position (a row's extra cells: its last)
            keep = (col >= torch.tensor(lo, device=device)[:, None, None]) & (col <= last[:, :, None])
            keep = keep[:, None]  # (n, 1, T, L)
        runs.append(Run(first, end, start, stop, keep, width, flat[first], gather))
    moved = any(r.tokens > 1 for r in runs)
    return Plan(runs, torch.tensor(scatter, device=device) if moved else None)


def _runs_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: Plan,
                 scaling: float | None) -> tuple[torch.Tensor, None]:
    """One sdpa per run of rows over the run's positions only. ``query`` (N, H, 1, D): one
    token per row, or N flat tokens of rows feeding several (checked drafts)."""
    n, h, _, d = query.shape  # key, value (B, Hkv, L, D)
    hkv = key.shape[1]
    g = h // hkv
    # grouped-query attention without repeat_kv: a row's H query heads as (Hkv, H/Hkv)
    # queries against its Hkv key heads (transformers' pack_gqa); its T tokens after them
    query = query.view(n, hkv, g, d)
    parts = []
    for r in plan.runs:
        rows = r.end - r.first
        if r.gather is None:
            q = query[r.flat_first:r.flat_first + rows]  # (rows, Hkv, G, D)
        else:
            q = query.index_select(0, r.gather).view(rows, r.tokens, hkv, g, d).permute(0, 2, 3, 1, 4)
            q = q.reshape(rows, hkv, g * r.tokens, d)
        out = F.scaled_dot_product_attention(q, key[r.first:r.end, :, r.start:r.stop], value[r.first:r.end, :, r.start:r.stop],
                                             attn_mask=r.mask(q.dtype, g), scale=scaling)
        if r.gather is not None:
            out = out.view(rows, hkv, g, r.tokens, d).permute(0, 3, 1, 2, 4).reshape(rows * r.tokens, hkv, g, d)
        parts.append(out)  # (cells, Hkv, G, D)
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    if plan.scatter is not None:
        out = out.index_select(0, plan.scatter)
    return out.reshape(n, 1, h, d), None  # (N, 1, H, D)


def attends_in_runs(model: torch.nn.Module) -> bool:
    """Whether ``model``'s decode steps can attend through ``segment_attention`` (it runs sdpa)."""
    return model.config._attn_implementation in ("sdpa", NAME)


@contextlib.contextmanager
def decode_steps(model: torch.nn.Module) -> Iterator[bool]:
    """Within the block ``model`` attends through ``segment_attention`` if it runs sdpa
    (its decode steps then take ``kv_plan``); yields whether it does. Eager and
    flash-attention models are left as they are (they take the padding mask)."""
    config = model.config
    old = config._attn_implementation
    if not attends_in_runs(model):
        yield False
        return
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = old


AttentionInterface.register(NAME, segment_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)

