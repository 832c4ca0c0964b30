"""The lane's KV cache (engine/cache.py): rows join and leave in place and the cache
always reads as its rows' keys and values, left-padded with zeros to the common width."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from chattune.engine import cache as kv

LAYERS, HEADS, DIM = 2, 3, 4


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """(H, n, d) -> (H, width, d): zeros in front, written out here rather than with the module's own helper."""
    return torch.cat([torch.zeros(x.shape[0], width - x.shape[1], x.shape[2], dtype=x.dtype), x], dim=1)


def _cache(rows: list[torch.Tensor]) -> DynamicCache:
    """A plain cache of ``rows`` (each (layers, 2, H, n, d)), left-padded to the widest."""
    width = max(r.shape[-2] for r in rows)
    out = DynamicCache()
    out.layers = [kv.GrowingLayer(torch.stack([_left_pad(r[i, 0], width) for r in rows]),
                                  torch.stack([_left_pad(r[i, 1], width) for r in rows])) for i in range(LAYERS)]
    return out


def _row(n: int, seed: int) -> torch.Tensor:
    return torch.randn(LAYERS, 2, HEADS, n, DIM, generator=torch.Generator().manual_seed(seed))


def _assert_holds(cache: DynamicCache, rows: list[torch.Tensor]) -> None:
    width = cache.get_seq_length()
    for i, layer in enumerate(cache.layers):
        want_k = torch.stack([_left_pad(r[i, 0], width) for r in rows])
        want_v = torch.stack([_left_pad(r[i, 1], width) for r in rows])
        assert torch.equal(layer.keys, want_k) and torch.equal(layer.values, want_v)


def test_rows_join_and_leave_in_place_and_the_cache_reads_as_left_padded_rows():
    rows = [_row(5, 0), _row(8, 1)]
    cache = kv.growing(_cache(rows), rows=4)
    buffers = [layer.kbuf for layer in cache.layers]
    kv.merge(cache, _cache([_row(3, 2)]))  # narrower: written into a free row
    rows.append(_row(3, 2))
    _assert_holds(cache, rows)
    assert [layer.kbuf for layer in cache.layers] == buffers  # no new buffer

    order = kv.keep(cache, [0, 2], 3, 8)  # row 1 (the widest) leaves: the last row moves into its slot
    assert order == [0, 2]
    rows = [rows[0], rows[2]]
    assert cache.get_seq_length() == 5  # three positions were padding in every remaining row
    _assert_holds(cache, rows)

    kv.merge(cache, _cache([_row(7, 3), _row(6, 4)]))  # wider, with room left of start: still in place
    rows += [_row(7, 3), _row(6, 4)]
    _assert_holds(cache, rows)
    assert [layer.kbuf for layer in cache.layers] == buffers

    for layer in cache.layers:  # new positions written in place
        layer.update(torch.ones(4, HEADS, 1, DIM), torch.zeros(4, HEADS, 1, DIM))
    rows = [torch.cat([r, torch.stack([torch.ones(HEADS, 1, DIM), torch.zeros(HEADS, 1, DIM)]).expand(LAYERS, -1, -1, -1, -1)],
                      dim=-2) for r in rows]
    _assert_holds(cache, rows)

    kv.merge(cache, _cache([_row(20, 5)]))  # wider than the room and more rows than the buffer: rebuilt
    rows.append(_row(20, 5))
    _assert_holds(cache, rows)
    assert cache.layers[0].kbuf is not buffers[0]


def test_a_full_buffer_grows_and_keeps_the_rows():
    rows = [_row(3, 0), _row(6, 1)]
    cache = kv.growing(_cache(rows), rows=2)
    for step in range(kv.SPARE + 5):
        k = torch.full((2, HEADS, 1, DIM), float(step))
        for layer in cache.layers:
            layer.update(k, -k)
        rows = [torch.cat([r, torch.stack([k[0], -k[0]]).expand(LAYERS, -1, -1, -1, -1)], dim=-2) for r in rows]
    _assert_holds(cache, rows)


def test_a_step_of_flat_tokens_writes_each_where_its_row_ends():
    """Rows that fed several tokens (checked drafts) write them after their own last
    position; ``advance`` then moves the end by the furthest kept."""
    rows = [_row(4, 0), _row(4, 1)]
    cache = kv.growing(_cache(rows), rows=2)
    # row 0 feeds 3 tokens, row 1 (lagging one column behind) 1
    writes = kv.Writes(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, -1]), reach=3)
    kv.write(cache, writes)
    new = torch.arange(4.0)[:, None, None, None].expand(4, HEADS, 1, DIM)
    for layer in cache.layers:
        keys, values = layer.update(new, -new)
        assert keys.shape[-2] == 4 + 3  # the view reaches the furthest token
        assert torch.equal(keys[0, :, 4:7], new[:3, :, 0].transpose(0, 1)) and torch.equal(keys[1, :, 3], new[3, :, 0])
        assert torch.equal(values[1, :, 3], -new[3, :, 0])
    kv.advance(cache, 2)  # row 0 kept 1 of its 2 drafts
    assert cache.get_seq_length() == 6 and all(layer.writes is None for layer in cache.layers)


def test_rows_joining_at_the_start_begin_where_the_view_begins():
    """Rows of models whose steps write where each row ends join at the view's start: a
    late or wide joiner does not move the others' ends, and the view widens only to the
    widest row."""
    rows = [_row(5, 0), _row(8, 1)]
    cache = kv.growing(_cache(rows), rows=4)
    kv.merge(cache, _cache([_row(3, 2)]), at_start=True)
    assert cache.get_seq_length() == 8
    for i, layer in enumerate(cache.layers):
        assert torch.equal(layer.keys[2, :, :3], _row(3, 2)[i, 0])  # at the start, zeros after it
        assert not layer.keys[2, :, 3:].any() and torch.equal(layer.keys[1], _row(8, 1)[i, 0])
    kv.merge(cache, _cache([_row(11, 3)]), at_start=True)  # wider than the view: it widens, in place
    assert cache.get_seq_length() == 11
    for i, layer in enumerate(cache.layers):
        assert torch.equal(layer.values[3], _row(11, 3)[i, 1]) and torch.equal(layer.values[1, :, :8], _row(8, 1)[i, 1])
    kv.merge(cache, _cache([_row(4, 4)]), at_start=True)  # more rows than the buffer: rebuilt, as aligned
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape[0] == 5 and torch.equal(layer.keys[4, :, :4], _row(4, 4)[i, 0])
        assert torch.equal(layer.keys[1, :, :8], _row(8, 1)[i, 0])
