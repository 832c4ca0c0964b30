"""Text statistics shared by the data filter and the evaluation (a module below both).

``repeated_ngram_rate`` is seq-rep-n (Welleck et al. 2020, "Neural Text Generation with
Unlikelihood Training", section 5): the share of an answer's n-grams that already occurred
earlier in it. It takes any sequence (model tokens in the evaluation, words in the data
filter). It is kept as a reported statistic, but it cannot tell a loop from structure: a
table, a block of similar code lines or eight test cases in one layout repeat most of their
4-grams too (the GPT-4 answer to Arena-Hard's ``73e36294...`` repeats 63% of its words'
4-grams and is no loop).

``loop_share`` is the one loop detector of the data filter and the eval. A degenerate loop
is the same span repeated back to back: the text stops moving forward. So it measures the
share of an answer's pieces (words and punctuation runs) that lie inside a span repeated at
least ``MIN_REPEATS`` times in a row, exactly, with

- list scaffolding normalised first (a line's ``1.``/``2.``/``-``/``*`` marker reads as one
  marker), so "1. Silk 2. Silk 3. Silk" is the loop it is;
- the values left as they are: test cases, table rows and code lines whose numbers or
  identifiers change from one to the next are not repeats, so structure is not a loop;
- a repeated unit that holds no letter or digit ignored (table rules ``|---|``, ASCII art,
  ``/ / /``);
- a run within one word split into its unit ("мамамама" is "ма" four times);
- a run that reaches the end of the answer needs only two whole copies and three or more
  pieces of a third: the loop the token budget cut.

Written by hand: no library detects repeated spans; a regex backreference search
(``(.{1,150}?)\\1{2,}``) finds the same spans but took ~11 ms an answer on the shared arena
file, this (numpy, one comparison per unit length) ~3 ms, and the seq-rep-4 pre-check below
skips the detector for the answers that cannot hold a loop.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

PIECE = re.compile(r"\w+|[^\w\s]+")
LIST_MARKER = re.compile(r"(?m)^[ \t]*(?:\d+[.)]|[-*+•])[ \t]+")
IN_WORD = re.compile(r"(\w{1,8}?)\1{2,}")
ALNUM = re.compile(r"[^\W_]")
MAX_UNIT = 64  # pieces in the longest repeated unit looked for (a long sentence)
MIN_REPEATS = 3  # a unit said twice is emphasis or a refrain; three times in a row is a loop
MIN_REGION = 12  # pieces a repeated run must cover ("doo doo doo" is a lyric, not a loop)
LOOP_SHARE = 0.3  # an answer with more of its pieces inside repeated runs than this is a loop
MAX_CHARS = 100_000  # only an answer's first 100k characters are read: bounded time on a hostile 10 MB answer


def repeated_ngram_rate(tokens: Sequence, n: int = 4) -> float:
    """Share of n-grams in one answer that already occurred earlier in it (0 = no loops)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def pieces(text: str) -> list[str]:
    """Words and punctuation runs of ``text[:MAX_CHARS]``, list markers normalised, in-word runs split."""
    out = []
    for w in PIECE.findall(LIST_MARKER.sub("- ", text[:MAX_CHARS])):
        if len(w) < 6 or not IN_WORD.search(w):
            out.append(w)
            continue
        pos = 0
        for m in IN_WORD.finditer(w):
            unit = m.group(1)
            out += ([w[pos:m.start()]] if m.start() > pos else []) + [unit] * (len(m.group(0)) // len(unit))
            pos = m.start() + len(m.group(0)) // len(unit) * len(unit)
        out += [w[pos:]] if pos < len(w) else []
    return out


def loop_share(text: str | list[str]) -> float:
    """Share of ``text``'s pieces inside a span repeated back to back (0 = no loop)."""
    ps = pieces(text) if isinstance(text, str) else text
    n = len(ps)
    if n < MIN_REGION:
        return 0.0
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(p, len(vocab)) for p in ps), dtype=np.int64, count=n)  # (n,)
    edges = np.zeros(n + 1, dtype=np.int64)  # +1 where a repeated run starts, -1 after it ends
    for p in range(1, min(MAX_UNIT, n // 2) + 1):  # n // 2: a cut run holds two whole copies
        same = ids[p:] == ids[:-p]  # (n - p,) piece i equals piece i + p
        if not same.any():
            continue
        step = np.diff(np.concatenate(([0], same.view(np.int8), [0])))
        need = max((MIN_REPEATS - 1) * p, MIN_REGION - p)  # run of matches: the region is run + p pieces
        starts, ends = np.flatnonzero(step == 1), np.flatnonzero(step == -1)
        # A run reaching the end, two whole copies and part of a third, is a loop cut by the token
        # budget (an answer that ends on the same paragraph twice, and nothing after, is not).
        long = (ends - starts >= need) | ((ends == n - p) & (ends - starts >= p + 3) & (ends - starts + p >= MIN_REGION))
        for start, end in zip(starts[long], ends[long]):
            if any(ALNUM.search(x) for x in ps[start:start + p]):
                edges[start] += 1
                edges[end + p] -= 1
    return float((np.cumsum(edges)[:n] > 0).mean())


def is_loop(text: str, threshold: float = LOOP_SHARE) -> bool:
    """True when more than ``threshold`` of ``text`` lies inside back-to-back repeats."""
    ps = pieces(text)
    # A repeated run covering R >= 12 pieces with a unit of p <= R / 2 pieces repeats
    # R - p - 3 > R / 4 of its 4-grams, so a loop share above ``threshold`` needs a seq-rep-4
    # above threshold / 4: below it the detector cannot fire (skips it for ~85% of the shared
    # arena answers; the same decisions on all of them).
    if repeated_ngram_rate(ps, 4) < threshold / 4:
        return False
    return loop_share(ps) > threshold
