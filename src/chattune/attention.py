"""Attention over packed rows, one conversation at a time.

A packed batch is one flat row of conversations with no padding (padding-free packing, as
flash-attention's varlen kernels take it): ``cu_seq_lens_q`` holds where each conversation
starts, ``position_ids`` restart at 0 in each. With flash-attention (CUDA) transformers
reads those kwargs natively. torch's sdpa has no varlen kernel, and a block-diagonal T x T
mask makes its CPU kernel compute every masked-out block too: with four conversations a
row, ~8x the attention work of causal attention per conversation, and a (T, T) mask in
memory (benchmarks/README.md profiles it: 23% of a LoRA step). So this module registers an
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
  and values in every layer. Given ``kv_runs`` (``plan_runs``: the rows cut into
  contiguous runs, each with the earliest first real position of its rows), attention
  runs one sdpa per run over that run's positions only, masking what padding is left.
  One call per row would skip all padding, but a call costs its overhead, and one row
  alone gives torch's CPU kernel only its Hkv heads to share among the cores (3 heads on
  2 cores: ~1.4x the time per position of rows in a batch); ``plan_runs`` weighs the
  padding a run reads against the calls it saves.
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


@dataclass
class Run:
    """Rows ``first:end`` of a decode step, attending positions ``start:``; ``keep`` (n, 1, 1,
    L - start) is True where a row's real positions are, None when all are."""

    first: int
    end: int
    start: int
    keep: torch.Tensor | None
    _masks: dict = field(default_factory=dict, repr=False)

    def mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``keep`` as an additive mask, made once for all layers: sdpa would turn a boolean
        mask into one at every call (a ``where`` per layer and run)."""
        if self.keep is None:
            return None
        if dtype not in self._masks:
            self._masks[dtype] = torch.zeros(self.keep.shape, dtype=dtype, device=self.keep.device).masked_fill_(
                ~self.keep, float("-inf"))
        return self._masks[dtype]


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      cu_seq_lens_q: torch.Tensor | None = None, kv_runs: list[Run] | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """sdpa per conversation of a flat packed row; for a decode step (one query token a
    row), per run of rows with ``kv_runs`` or grouped-query over the shared cache;
    transformers' sdpa otherwise."""
    if query.shape[2] == 1:
        if kv_runs is not None:
            return _runs_decode(query, key, value, kv_runs, scaling)
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
        # torch's CPU flash kernel, forward + backward at 9 heads x 64, runs float32 2.4-3.4x
        # faster than bfloat16 at 64-150 tokens, as fast at 300, 7% slower at 600
        # (benchmarks/kernels.py); conversations are mostly 100-300 tokens, and float32 is
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


def plan_runs(starts: list[int], length: int, device: torch.device | str = "cpu") -> list[Run]:
    """Cut a decode step's rows (in cache order; ``starts[i]``: row i's first real position
    of ``length``) into contiguous runs of least cost: each run reads every row's positions
    from the run's earliest start, plus ``CALL_COST``; a row alone costs ``ALONE_COST``
    times its positions. Dynamic programming over where runs end, O(rows^2)."""
    n = len(starts)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        low = length
        for first in range(end - 1, -1, -1):
            low = min(low, starts[first])
            rows = end - first
            cost = best[first] + CALL_COST + rows * (length - low) * (ALONE_COST if rows == 1 else 1.0)
            if cost < best[end]:
                best[end], cut[end] = cost, first
    bounds, end = [], n
    while end:
        bounds.append((cut[end], end))
        end = cut[end]
    runs = []
    for first, end in reversed(bounds):
        own = starts[first:end]
        start, mask = min(own), None
        if max(own) > start:
            mask = torch.arange(start, length, device=device)[None, :] >= torch.tensor(own, device=device)[:, None]
            mask = mask[:, None, None, :]  # (n, 1, 1, L - start)
        runs.append(Run(first, end, start, mask))
    return runs


def _runs_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, runs: list[Run],
                 scaling: float | None) -> tuple[torch.Tensor, None]:
    """One query token per row; one sdpa per run of rows over the run's positions only."""
    b, h, _, d = query.shape  # (B, H, 1, D); key, value (B, Hkv, L, D)
    hkv = key.shape[1]
    # grouped-query attention without repeat_kv: a row's H query heads as (Hkv, H/Hkv)
    # queries against its Hkv key heads (transformers' pack_gqa)
    query = query.view(b, hkv, h // hkv, d)
    parts = [F.scaled_dot_product_attention(query[r.first:r.end], key[r.first:r.end, :, r.start:],
                                            value[r.first:r.end, :, r.start:], attn_mask=r.mask(query.dtype),
                                            scale=scaling)
             for r in runs]  # (n, Hkv, H/Hkv, D) each
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out.view(b, h, 1, d).transpose(1, 2).contiguous(), None  # (B, 1, H, D)


@contextlib.contextmanager
def decode_steps(model: torch.nn.Module) -> Iterator[bool]:
    """Within the block ``model`` attends through ``segment_attention`` if it runs sdpa
    (its decode steps then take ``kv_runs``); yields whether it does. Eager and
    flash-attention models are left as they are (they take the padding mask)."""
    config = model.config
    old = config._attn_implementation
    if old not in ("sdpa", NAME):
        yield False
        return
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = old


AttentionInterface.register(NAME, segment_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)

