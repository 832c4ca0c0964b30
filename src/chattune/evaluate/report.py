"""Plain-text tables for eval results."""

from __future__ import annotations

# (label, key, kind) in table order; kind picks the format
ROWS = [("ends with EOS", "eos_share", "rate"), ("starts a new turn itself", "new_turn_share", "rate"),
        ("cut at the token limit", "cut_share", "rate"), ("seq-rep-4 (mean)", "rep4", "num"),
        ("loops (repeated spans)", "loop_share", "rate"), ("distinct-2", "distinct_2", "num"),
        ("median length (tokens)", "median_length", "len"), ("median length / reference", "length_ratio", "ratio"),
        ("ROUGE-L vs reference", "rouge_l", "num")]
WIDTH = 19


def _fmt(value, kind: str, ci=None) -> str:
    if value is None:
        return "–"
    if kind == "rate":
        text = f"{value:.0%}" + (f" [{ci[0]:.0%}-{ci[1]:.0%}]" if ci else "")
    elif kind == "len":
        text = f"{value:.0f}" + (f" [{ci[0]:.0f}-{ci[1]:.0f}]" if ci else "")
    elif kind == "ratio":
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}" + (f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else "")
    return text


def _columns(result: dict) -> list[tuple[str, dict]]:
    decodings = list(result["settings"]["decodings"])
    headline = result["settings"]["headline"]
    order = [headline] + [d for d in decodings if d != headline]
    cols = []
    for d in order:
        for m in ("tuned", "base"):
            if m in result and d in result[m]:
                cols.append((f"{m} {d}" + ("" if d == headline else "*"), result[m][d]))
    if "reference" in result:
        cols.append(("reference", result["reference"]))
    return cols


def eval_table(result: dict) -> str:
    p, s = result["prompts"], result["settings"]
    where = p["file"] or p["source"]
    ref = f", reference answers: {p['reference_model']}" if p.get("reference_model") else ""
    dropped = {**p["dropped"], **p["skipped"]}
    lines = [f"{p['used']} prompts from {where} ({p['format']}{ref}), method {result['method']}, "
             f"{s['max_new_tokens']} new tokens" + (f"; not used: {dropped}" if dropped else "")]
    if "sampled" in s["decodings"]:
        d = s["decodings"]["sampled"]
        lines.append(f"sampled = the shipped decoding (temperature {d['temperature']}, top-p {d['top_p']}, top-k "
                     f"{d['top_k']}, repetition penalty {d['repetition_penalty']}, seeded): the headline")
    if "greedy" in s["decodings"] and s["headline"] != "greedy":
        lines.append("* greedy = argmax, no penalty: a diagnostic of loops the sampling hides, not what users get")
    lines.append("intervals: 95% bootstrap over prompts")
    cols = _columns(result)
    lines.append(f"{'':28s}" + "".join(f"{name:>{WIDTH}s}" for name, _ in cols))
    for label, key, kind in ROWS:
        cells = [_fmt(c.get(key), kind, c.get("ci", {}).get(key)) if key in c else "–" for _, c in cols]
        if any(x != "–" for x in cells):
            lines.append(f"{label:28s}" + "".join(f"{x:>{WIDTH}s}" for x in cells))
    lines += _loss_lines(result) + _paired_lines(result) + _pair_lines(result.get("pairs")) + _judge_lines(result.get("judge"))
    return "\n".join(lines)


def _loss_lines(result: dict) -> list[str]:
    out = []
    for m in ("tuned", "base"):
        r = result.get(m, {})
        if "loss" in r:
            ci = r.get("loss_ci")
            interval = f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else ""
            out.append(f"reference-answer loss, {m}: {r['loss']:.4f}{interval} nats/token, perplexity {r['ppl']:.2f} "
                       f"({r['loss_tokens']} tokens of {result['samples']} references); all-token perplexity "
                       f"{r['all_ppl']:.2f}")
    return out


def _paired_lines(result: dict) -> list[str]:
    out = []
    for d, p in result.get("paired", {}).items():
        out.append(f"paired ({d}): tuned ends with EOS and base does not on {p['tuned_stops_base_not']} of "
                   f"{p['pairs']} answers, the reverse on {p['base_stops_tuned_not']}")
    return out


def _judge_lines(j: dict | None) -> list[str]:
    if not j:
        return []
    head = (f"judge {j['judge_model']} ({j['decoding']} answers, each pair in both orders): {j['judgements']} "
            f"judgements, {j['unparseable']} unparseable, {j['new_requests']} new requests")
    if "win_rate" not in j:
        return [head, "no parseable verdict: no win rate"]
    w, lc = j["win_rate_ci"], j["lc_win_rate_ci"]
    return [head, f"tuned vs base win rate {j['win_rate']:.1%} [{w[0]:.1%}-{w[1]:.1%}], length-controlled "
                  f"{j['lc_win_rate']:.1%} [{lc[0]:.1%}-{lc[1]:.1%}]; verdicts {j['verdicts']}"]


PAIR_ROWS = [("tuned model's implicit reward", "implicit_reward"),
             ("reference likelihood ranking", "reference_likelihood"), ("longer answer wins", "longer_answer"),
             ("kto: desirable over undesirable (AUC)", "desirable_vs_undesirable")]


def _pair_lines(pairs: dict | None) -> list[str]:
    """Held-out pair accuracy of a preference run (``preference_eval.pair_accuracies``)."""
    if not pairs:
        return []
    answers = f", {pairs['n']} answers" if "desirable_vs_undesirable" in pairs else ""  # kto: answers, and pairs of them
    lines = [f"held-out pair accuracy ({pairs['objective']}, {pairs.get('pairs', pairs['n'])} pairs{answers}), "
             "95% bootstrap interval:"]
    for label, key in PAIR_ROWS:
        if key in pairs and pairs[key]["accuracy"] is not None:
            a = pairs[key]
            lines.append(f"  {label:34s}{a['accuracy']:>8.1%}  [{a['low']:.1%}, {a['high']:.1%}]")
    return lines
