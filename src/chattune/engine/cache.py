"""The batch's KV cache: transformers' ``DynamicCache`` with layers that grow in place.

``DynamicLayer.update`` concatenates, so every decode step copies each layer's whole
cache (B, H, L, d) once more; at 16 rows of ~400 positions that is as many bytes as
SmolLM2's weights. Here each layer keeps a buffer with spare positions at the end: a step
writes its one new position in place and returns views. Rows joining (left-padded to the
common width) and leaving (dropped, common padding trimmed) rebuild the buffers; that
happens once per request, not once per token.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

SPARE = 64  # positions added whenever a buffer is full


class GrowingLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self._set(keys, values)

    def _set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take (B, H, n, d) keys and values, with room for SPARE more positions."""
        b, h, n, d = keys.shape
        self.kbuf = keys.new_empty(b, h, n + SPARE, d)
        self.vbuf = values.new_empty(b, h, n + SPARE, values.shape[-1])
        self.kbuf[:, :, :n] = keys
        self.vbuf[:, :, :n] = values
        self.n = n
        self.is_initialized, self.device, self.dtype = True, keys.device, keys.dtype

    @property
    def keys(self) -> torch.Tensor:
        return self.kbuf[:, :, : self.n]

    @keys.setter
    def keys(self, value) -> None:  # DynamicLayer.__init__ assigns None; our buffers are set by _set
        pass

    @property
    def values(self) -> torch.Tensor:
        return self.vbuf[:, :, : self.n]

    @values.setter
    def values(self, value) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        t = key_states.shape[-2]
        if self.n + t > self.kbuf.shape[-2]:
            self._set(self.keys, self.values)  # copy into a larger buffer
        self.kbuf[:, :, self.n:self.n + t] = key_states
        self.vbuf[:, :, self.n:self.n + t] = value_states
        self.n += t
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n


def growing(cache: DynamicCache) -> DynamicCache:
    """A cache of ``GrowingLayer`` holding the keys and values of ``cache``."""
    out = DynamicCache()
    out.layers = [GrowingLayer(layer.keys, layer.values) for layer in cache.layers]
    out.layer_class_to_replicate = None
    return out


def merge(cache: DynamicCache, other: DynamicCache) -> None:
    """Append ``other``'s rows to ``cache``, both left-padded to the wider one."""
    width = max(cache.get_seq_length(), other.get_seq_length())
    for mine, theirs in zip(cache.layers, other.layers):
        mine._set(torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)]),
                  torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)]))


def rows(cache: DynamicCache, index: torch.Tensor) -> DynamicCache:
    """A cache of ``cache``'s rows ``index`` (repeats allowed), as plain tensors."""
    out = DynamicCache()
    out.layers = [GrowingLayer(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                  for layer in cache.layers]
    out.layer_class_to_replicate = None
    return out


def select(cache: DynamicCache, index: torch.Tensor, width: int) -> None:
    """Keep rows ``index`` and only the last ``width`` positions."""
    for layer in cache.layers:
        start = layer.n - width
        layer._set(layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:])


def crop(cache: DynamicCache, width: int) -> None:
    """Keep the first ``width`` positions (a one-row lane after a speculative step)."""
    for layer in cache.layers:
        layer.n = width


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[-2], 0)) if x.shape[-2] < width else x
