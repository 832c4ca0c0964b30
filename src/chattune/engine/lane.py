"""The engine's rows (one answer being decoded) and lanes (the rows of one variant and
their shared, left-padded KV cache; a row that kept fewer drafted tokens than another ends
``lag`` columns before the cache's end)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from chattune.engine import cache as kv
from chattune.engine.lookup import Lookup
from chattune.engine.text import TextTracker

if TYPE_CHECKING:
    from chattune.engine.requests import Request


@dataclass
class Row:
    req: Request
    text: TextTracker
    seed: int | None  # the request's sampling seed (drawn when it has none); None: greedy
    length: int  # cache positions of this row (virtual tokens + prompt + fed answer tokens)
    last: int  # token to feed at the next step
    budget: int
    started: float
    tokens: list[int] = field(default_factory=list)
    done: str | None = None
    cancelled: bool = False
    lookup: Lookup | None = None  # its n-gram index, from its first speculative step on
    lag: int = 0  # columns between its last position and the lane cache's end (rows that kept fewer drafts)


class Lane:
    """The rows of one variant and their shared, left-padded cache."""

    def __init__(self, capacity: int = 1):
        self.capacity = capacity  # rows the cache buffers are made for (the engine's max_batch)
        self.rows: list[Row] = []
        self.cache = None  # cache.growing DynamicCache, (B, H, L, d) per layer
        self.seen: torch.Tensor | None = None  # (B, V) generated tokens, for the repetition penalty

    @property
    def width(self) -> int:
        return self.cache.get_seq_length() if self.rows else 0

    def add(self, rows: list[Row], cache, seen: torch.Tensor, at_start: bool = False) -> None:
        """Rows joining with their (left-padded) cache rows and (len(rows), V) ``seen``;
        ``at_start``: they begin where the cache's view begins rather than end where it
        ends (``kv.merge``), so rows that run ahead by kept drafts, or joined late, do not
        stretch every row's width (steps then write where each row ends)."""
        if not self.rows:
            self.rows, self.cache, self.seen = list(rows), kv.growing(cache, self.capacity), seen
            return
        before, n = self.width, cache.get_seq_length()
        kv.merge(self.cache, cache, at_start)
        if at_start:
            for r in self.rows:
                r.lag += self.width - before
            for r in rows:
                r.lag = self.width - n
        self.rows += rows
        self.seen = torch.cat([self.seen, seen])

    def drop(self, keep: list[int]) -> None:
        """Keep rows ``keep``; columns that are padding in every kept row go."""
        if not keep:
            self.rows, self.cache, self.seen = [], None, None
            return
        width, kept = self.width, [self.rows[i] for i in keep]
        lag = min(r.lag for r in kept)
        first = min(width - r.lag - r.length for r in kept)
        order = kv.keep(self.cache, keep, first, width - lag)
        self.rows = [self.rows[i] for i in order]
        for r in self.rows:
            r.lag -= lag
        self.seen = self.seen.index_select(0, torch.tensor(order, device=self.seen.device))
