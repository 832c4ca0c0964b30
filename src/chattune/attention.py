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
- Ragged steps: the rows share a cache left-padded to the longest row, and a masked sdpa
  reads and scores every padded position of every row. One 2,500-token Arena-Hard prompt
  among 31 short ones makes each step read ~31 x 2,500 padded positions of keys and
  values in every layer. Given ``kv_starts`` (each row's first real cache position),
  attention runs per row on its own positions only; the engine passes it when padding
  dominates.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "chattune_sdpa"


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      cu_seq_lens_q: torch.Tensor | None = None, kv_starts: list[int] | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """sdpa per conversation of a flat packed row; for a decode step (one query token a
    row), per row with ``kv_starts`` or grouped-query over the shared cache; transformers'
    sdpa otherwise."""
    if query.shape[2] == 1:
        if kv_starts is not None:
            return _ragged_decode(query, key, value, kv_starts, scaling)
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


def _ragged_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, starts: list[int],
                   scaling: float | None) -> tuple[torch.Tensor, None]:
    """One query token per row against that row's cache positions ``starts[i]:`` only."""
    _, h, _, d = query.shape  # (B, H, 1, D); key, value (B, Hkv, L, D)
    hkv = key.shape[1]
    # grouped-query attention without repeat_kv: a row's H query heads as (Hkv, H/Hkv)
    # queries against its Hkv key heads (transformers' pack_gqa)
    parts = [F.scaled_dot_product_attention(query[i].view(1, hkv, h // hkv, d), key[i:i + 1, :, s:],
                                            value[i:i + 1, :, s:], scale=scaling).view(1, h, 1, d)
             for i, s in enumerate(starts)]
    return torch.cat(parts).transpose(1, 2).contiguous(), None  # (B, 1, H, D)


@contextlib.contextmanager
def decode_steps(model: torch.nn.Module) -> Iterator[bool]:
    """Within the block ``model`` attends through ``segment_attention`` if it runs sdpa
    (its decode steps then take ``kv_starts``); yields whether it does. Eager and
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

