"""The numbers of an evaluation: reference-answer loss, text metrics of answers, and 95%
bootstrap intervals over prompts.

ROUGE-L, distinct-n and seq-rep-n are a few lines each, so they are written here rather
than pulling in ``rouge-score`` and its NLTK dependency. The bootstrap resamples prompts
(all answers to one prompt move together) with numpy, as in Arena-Hard's own intervals.
"""

from __future__ import annotations

import statistics

import numpy as np

from chattune.data.textstats import is_loop, repeated_ngram_rate

# "loops" is the data filter's detector (chattune.data.textstats.is_loop: a span repeated back
# to back, not code, lists or tables); seq-rep-4 over model tokens stays a reported statistic.
RESAMPLES = 1000


# -- text metrics ------------------------------------------------------------------------
def distinct_n(answers: list[list], n: int = 2) -> float:
    """Corpus-level distinct-n (Li et al. 2016): unique n-grams / all n-grams."""
    grams = [tuple(a[i:i + n]) for a in answers for i in range(len(a) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (Lin 2004)."""
    c, r = candidate.lower().split(), reference.lower().split()
    if not c or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for x in c:  # LCS by dynamic programming, one row at a time
        cur = [0]
        for j, y in enumerate(r):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


# -- intervals ---------------------------------------------------------------------------
class Bootstrap:
    """Resamples of prompts, shared by every statistic over values owned by those prompts.

    ``owners[k]`` is the prompt of value ``k``; a resample draws ``n_prompts`` prompts with
    replacement and weighs each value by how often its prompt was drawn.
    """

    def __init__(self, owners: list[int], n_prompts: int, resamples: int = RESAMPLES, seed: int = 0):
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, max(n_prompts, 1), size=(resamples, max(n_prompts, 1)))
        counts = np.zeros((resamples, max(n_prompts, 1)))
        np.add.at(counts, (np.arange(resamples)[:, None], picks), 1)
        self.weights = counts[:, np.asarray(owners, dtype=int)] if len(owners) else np.zeros((resamples, 0))  # (R, A)

    def mean(self, values) -> list[float] | None:
        v = np.asarray(values, dtype=float)
        return self.ratio(v, np.ones_like(v))

    def ratio(self, num, den) -> list[float] | None:
        """Interval of sum(num) / sum(den), e.g. a token-weighted loss."""
        if not len(num):
            return None
        w = self.weights
        total = w @ np.asarray(den, dtype=float)
        ok = total > 0
        return _percentiles((w @ np.asarray(num, dtype=float))[ok] / total[ok])

    def median(self, values) -> list[float] | None:
        if not len(values):
            return None
        v = np.asarray(values, dtype=float)
        order = np.argsort(v)
        cum = self.weights[:, order].cumsum(1)  # (R, A)
        idx = (cum >= cum[:, -1:] / 2).argmax(1)
        return _percentiles(v[order][idx])


def _percentiles(x: np.ndarray) -> list[float] | None:
    if not len(x):
        return None
    lo, hi = np.percentile(x, [2.5, 97.5])
    return [float(lo), float(hi)]


# -- per model and decoding -----------------------------------------------------------------
def answer_metrics(rows: list[dict], n_prompts: int, ref_median: float | None) -> dict:
    """Metrics of one model under one decoding.

    ``rows``: ``{"prompt": index, "turn", "tokens": [...], "text", "finish", "reference"}``
    per answer. Rates come with ``ci[key] = [low, high]``, 95% over prompts.
    """
    boot = Bootstrap([r["prompt"] for r in rows], n_prompts)
    reps = [repeated_ngram_rate(r["tokens"]) for r in rows]
    flags = {
        "eos_share": [r["finish"] == "eos" for r in rows],
        "new_turn_share": [r["finish"] == "stop" for r in rows],
        "cut_share": [r["finish"] == "length" for r in rows],
        "loop_share": [is_loop(r["text"]) for r in rows],
    }
    out: dict = {"answers": len(rows), "ci": {}}
    for key, values in flags.items():
        out[key] = sum(values) / max(len(values), 1)
        out["ci"][key] = boot.mean(values)
    out["rep4"] = sum(reps) / max(len(reps), 1)
    out["ci"]["rep4"] = boot.mean(reps)
    # distinct-2 has no interval: a resample repeats answers, which reads as repetition
    out["distinct_2"] = distinct_n([r["tokens"] for r in rows], 2)
    lengths = [len(r["tokens"]) for r in rows]
    out["median_length"] = float(statistics.median(lengths)) if lengths else 0.0
    out["ci"]["median_length"] = boot.median(lengths)
    out["mean_length"] = sum(lengths) / max(len(lengths), 1)
    out["length_ratio"] = out["median_length"] / ref_median if ref_median else None
    scored = [r for r in rows if r.get("reference") is not None and r["turn"] == 0]
    if scored:
        scores = [rouge_l(r["text"], r["reference"]) for r in scored]
        out["rouge_l"] = sum(scores) / len(scores)
        out["ci"]["rouge_l"] = Bootstrap([r["prompt"] for r in scored], n_prompts).mean(scores)
    return out


def reference_metrics(references: list[list[int]], texts: list[str]) -> dict:
    """The anchor row: the same text metrics on the reference answers themselves (token ids
    and their texts, in the same order)."""
    boot = Bootstrap(list(range(len(references))), len(references))
    reps = [repeated_ngram_rate(t) for t in references]
    loops = [is_loop(t) for t in texts]
    lengths = [len(t) for t in references]
    return {
        "answers": len(references), "rep4": sum(reps) / len(reps), "loop_share": sum(loops) / len(loops),
        "distinct_2": distinct_n(references, 2), "median_length": float(statistics.median(lengths)),
        "mean_length": sum(lengths) / len(lengths), "length_ratio": 1.0,
        "ci": {"rep4": boot.mean(reps), "loop_share": boot.mean(loops), "median_length": boot.median(lengths)},
    }


def paired_stops(tuned: list[dict], base: list[dict]) -> dict:
    """Answers to the same prompt and turn: tuned ends with EOS and base does not, and the reverse."""
    b = {(r["prompt"], r["turn"]): r["finish"] == "eos" for r in base}
    pairs = [(r["finish"] == "eos", b[(r["prompt"], r["turn"])]) for r in tuned if (r["prompt"], r["turn"]) in b]
    return {"pairs": len(pairs), "tuned_stops_base_not": sum(t and not s for t, s in pairs),
            "base_stops_tuned_not": sum(s and not t for t, s in pairs)}


def loss_interval(per_sample: list[list]) -> list[float] | None:
    """95% interval of the token-weighted answer loss, resampling samples."""
    boot = Bootstrap(list(range(len(per_sample))), len(per_sample))
    return boot.ratio([s for s, _ in per_sample], [n for _, n in per_sample])
