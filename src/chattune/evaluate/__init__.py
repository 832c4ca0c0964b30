"""Evaluation: tuned vs base answers under the shipped decoding and greedy, their metrics
with intervals, the reference-answer loss, answer files for benchmarks' judges, and an
optional LLM judge. ``run`` orchestrates; ``metrics``, ``answers`` and ``judge`` hold the parts."""

from chattune.evaluate.metrics import distinct_n, repeated_ngram_rate, rouge_l
from chattune.evaluate.run import DECODINGS, HEADLINE, evaluate_run

__all__ = ["DECODINGS", "HEADLINE", "distinct_n", "evaluate_run", "repeated_ngram_rate", "rouge_l"]
