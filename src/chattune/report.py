"""Plain-text tables for eval results."""

from __future__ import annotations

ROWS = [("answer-token loss", "loss", "{:.4f}"), ("answer-token perplexity", "ppl", "{:.2f}"),
        ("all-token loss", "all_loss", "{:.4f}"), ("all-token perplexity (seed: 7.22)", "all_ppl", "{:.2f}"),
        ("EOS rate", "eos_rate", "{:.0%}"), ("repeated 4-gram rate", "repeat_4gram", "{:.3f}"),
        ("distinct-2", "distinct_2", "{:.3f}"), ("mean answer length (tokens)", "mean_length", "{:.1f}"),
        ("ROUGE-L vs reference", "rouge_l", "{:.3f}")]

PAIR_ROWS = [("tuned model's implicit reward", "implicit_reward"),
             ("reference likelihood ranking", "reference_likelihood"), ("longer answer wins", "longer_answer")]


def eval_table(result: dict) -> str:
    cols = [c for c in ("base", "tuned") if c in result]
    head = f"{result['split']} split, {result['samples']} samples, method {result['method']}"
    lines = [head, f"{'metric':36s}" + "".join(f"{c:>12s}" for c in cols)]
    for label, key, fmt in ROWS:
        if all(key in result[c] for c in cols):
            lines.append(f"{label:36s}" + "".join(f"{fmt.format(result[c][key]):>12s}" for c in cols))
    if "pairs" in result:
        lines.append(f"held-out pair accuracy ({result['pairs']['objective']}), 95% bootstrap interval:")
        for label, key in PAIR_ROWS:
            if key in result["pairs"]:
                a = result["pairs"][key]
                lines.append(f"  {label:34s}{a['accuracy']:>8.1%}  [{a['low']:.1%}, {a['high']:.1%}]")
    return "\n".join(lines)
