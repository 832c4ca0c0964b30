"""Text statistics shared by the data filter and the evaluation (a module below both).

``repeated_ngram_rate`` is seq-rep-n (Welleck et al. 2020, "Neural Text Generation with
Unlikelihood Training", section 5): the share of an answer's n-grams that already occurred
earlier in it. It takes any sequence (model tokens in the evaluation, words in the data
filter), so neither caller needs the other's module.
"""

from __future__ import annotations

from collections.abc import Sequence


def repeated_ngram_rate(tokens: Sequence, n: int = 4) -> float:
    """Share of n-grams in one answer that already occurred earlier in it (0 = no loops)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0
