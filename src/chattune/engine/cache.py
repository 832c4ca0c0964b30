"""The lane's KV cache: transformers' ``DynamicCache`` with layers that change in place.

``DynamicLayer.update`` concatenates, so every decode step would copy each layer's whole
cache (B, H, L, d) once more. Here each layer is a buffer (rows, H, positions, d) and the
cache is a view of it, ``buf[:b, :, start:end]``:
- a step writes its new positions in place (the buffer grows by a quarter when full);
- a row that leaves is overwritten by the last row (one row copied, not the cache), and
  positions that became padding in every row are dropped by moving ``start``;
- joining rows are written into free rows of the buffer, left-padded to the common width;
- a step of rows that checked drafts (``Writes``) writes each row's tokens after its own
  last position, and ``advance`` moves the end by the furthest kept: rows that kept fewer
  end before it (the engine's ``Row.lag``), their columns past their end masked.
Rebuilding the cache on every join and leave instead cost a third of an Arena-Hard eval's
answer time (32 rows of up to 2,500 positions; 1-2 s a rebuild, mostly page faults of the
new buffers). The buffer is rebuilt only when rows outgrow it or a joining prompt is wider
than the room left of ``start``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

SPARE = 64  # positions added at the least whenever a buffer is full


@dataclass
class Writes:
    """Where a decode step's N flat tokens go: token k into row ``rows[k]`` at column
    ``end + offsets[k]``; ``reach``: the furthest of them, in columns past ``end``."""

    rows: torch.Tensor  # (N,)
    offsets: torch.Tensor  # (N,)
    reach: int


class GrowingLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int | None = None):
        super().__init__()
        self._set(keys, values, rows)

    def _set(self, keys: torch.Tensor, values: torch.Tensor, rows: int | None = None) -> None:
        """Take (B, H, n, d) keys and values into a buffer of max(``rows``, B) rows, with
        spare positions after them."""
        b, h, n, d = keys.shape
        rows = max(rows or b, b)
        size = n + max(SPARE, n // 4)
        self.kbuf = keys.new_empty(rows, h, size, d)
        self.vbuf = values.new_empty(rows, h, size, values.shape[-1])
        for buf, x in ((self.kbuf, keys), (self.vbuf, values)):
            buf[:b, :, :n] = x
            buf[:b, :, n:] = 0  # never garbage where masked (a row that lags reads past its end): 0 x NaN is NaN
        self.b, self.start, self.end = b, 0, n
        self.writes: Writes | None = getattr(self, "writes", None)
        self.is_initialized, self.device, self.dtype = True, keys.device, keys.dtype

    @property
    def keys(self) -> torch.Tensor:
        return self.kbuf[: self.b, :, self.start: self.end]

    @keys.setter
    def keys(self, value) -> None:  # DynamicLayer.__init__ assigns None; our buffers are set by _set
        pass

    @property
    def values(self) -> torch.Tensor:
        return self.vbuf[: self.b, :, self.start: self.end]

    @values.setter
    def values(self, value) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """A decode step's keys and values: (B, H, t, d) written after ``end`` in every row,
        or with ``writes`` set, (N, H, 1, d) flat tokens written where ``writes`` says
        (``end`` then moves at ``advance``, once the step knows which tokens stay)."""
        w = self.writes
        t = key_states.shape[-2] if w is None else w.reach
        if self.end + t > self.kbuf.shape[-2]:
            self._set(self.keys, self.values, self.kbuf.shape[0])  # copy into a larger buffer
        if w is None:
            self.kbuf[: self.b, :, self.end: self.end + t] = key_states
            self.vbuf[: self.b, :, self.end: self.end + t] = value_states
            self.end += t
            return self.keys, self.values
        cols = w.offsets + self.end
        self.kbuf[w.rows, :, cols] = key_states[:, :, 0]
        self.vbuf[w.rows, :, cols] = value_states[:, :, 0]
        return self.kbuf[: self.b, :, self.start: self.end + t], self.vbuf[: self.b, :, self.start: self.end + t]

    def get_seq_length(self) -> int:
        return self.end - self.start


def growing(cache: DynamicCache, rows: int | None = None) -> DynamicCache:
    """A cache of ``GrowingLayer`` holding ``cache``'s keys and values, with room for ``rows`` rows."""
    out = DynamicCache()
    out.layers = [GrowingLayer(layer.keys, layer.values, rows) for layer in cache.layers]
    out.layer_class_to_replicate = None
    return out


def merge(cache: DynamicCache, other: DynamicCache, at_start: bool = False) -> None:
    """Append ``other``'s rows to ``cache``: ending where ``cache``'s rows end, both
    left-padded to the wider one; or ``at_start``, beginning where the view begins (the
    rows' ends then differ: only for steps that write where each row ends, ``Writes``)."""
    for mine, theirs in zip(cache.layers, other.layers):
        (_append_at_start if at_start else _append)(mine, theirs.keys, theirs.values)


def _append_at_start(layer: GrowingLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    k, _, n, _ = keys.shape
    width = layer.end - layer.start
    if layer.start + n > layer.kbuf.shape[-2] or layer.b + k > layer.kbuf.shape[0]:
        wide = max(n, width)
        layer._set(torch.cat([_right_pad(layer.keys, wide), _right_pad(keys, wide)]),
                   torch.cat([_right_pad(layer.values, wide), _right_pad(values, wide)]), layer.kbuf.shape[0])
        return
    rows = slice(layer.b, layer.b + k)
    for buf, new in ((layer.kbuf, keys), (layer.vbuf, values)):
        buf[rows, :, layer.start: layer.start + n] = new
        buf[rows, :, layer.start + n:] = 0  # past the rows' ends: masked, never garbage
    layer.end = max(layer.end, layer.start + n)
    layer.b += k


def _append(layer: GrowingLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    k, _, n, _ = keys.shape
    width = layer.end - layer.start
    if n > width and layer.start >= n - width:  # wider rows: the room left of start becomes padding
        layer.start -= n - width
        layer.kbuf[: layer.b, :, layer.start: layer.start + n - width] = 0
        layer.vbuf[: layer.b, :, layer.start: layer.start + n - width] = 0
        width = n
    if n > width or layer.b + k > layer.kbuf.shape[0]:
        wide = max(n, width)
        layer._set(torch.cat([_left_pad(layer.keys, wide), _left_pad(keys, wide)]),
                   torch.cat([_left_pad(layer.values, wide), _left_pad(values, wide)]), layer.kbuf.shape[0])
        return
    rows, pad = slice(layer.b, layer.b + k), layer.end - n
    for buf, new in ((layer.kbuf, keys), (layer.vbuf, values)):
        buf[rows, :, layer.start: pad] = 0  # padding: masked, but never garbage (0 x NaN is NaN)
        buf[rows, :, pad: layer.end] = new
    layer.b += k


def rows(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A cache of ``cache``'s rows ``index`` (repeats allowed), as plain tensors."""
    out = DynamicCache()
    out.layers = [GrowingLayer(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                  for layer in cache.layers]
    out.layer_class_to_replicate = None
    return out


def keep(cache: DynamicCache, kept: list[int], first: int, last: int) -> list[int]:
    """Keep rows ``kept`` (ascending) and the columns ``first:last`` of the current view, in
    place: the last kept rows move into the slots of the rows that leave. Returns the new
    row order (the old index of each row)."""
    b = len(kept)
    order = list(range(b))
    staying = set(kept)
    holes = [i for i in range(b) if i not in staying]
    movers = [i for i in kept if i >= b]
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    for layer in cache.layers:
        for hole, mover in zip(holes, movers):
            layer.kbuf[hole, :, layer.start: layer.end] = layer.kbuf[mover, :, layer.start: layer.end]
            layer.vbuf[hole, :, layer.start: layer.end] = layer.vbuf[mover, :, layer.start: layer.end]
        layer.b, layer.start, layer.end = b, layer.start + first, layer.start + last
    return order


def write(cache: DynamicCache, writes: Writes | None) -> None:
    """Where the next step's tokens go (None: one a row, after ``end``)."""
    for layer in cache.layers:
        layer.writes = writes


def advance(cache: DynamicCache, columns: int) -> None:
    """Move ``end`` on by ``columns`` after a step that wrote ``Writes``."""
    for layer in cache.layers:
        layer.end += columns
        layer.writes = None


def _right_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[-2])) if x.shape[-2] < width else x


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[-2], 0)) if x.shape[-2] < width else x
