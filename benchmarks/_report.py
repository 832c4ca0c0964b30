"""The table and the JSON summary that ``throughput.py`` prints for each model."""

from __future__ import annotations

import math
import statistics

SYSTEMS = ["seed", "trl", "chattune"]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def report(r: dict, machine: dict) -> str:
    s = r["systems"]
    lines = [f"== {r['model']} ({r['params'] / 1e6:.1f}M parameters) on {machine['device']}, "
             f"{machine['torch_threads']} torch threads, {machine['env'] or 'inherited environment'} for all systems",
             f"   {r['steps']} optimiser steps = {r['conversations']} conversations, "
             f"{len(r['seeds'])} training seed(s) for trl and chattune (rates pooled, val loss their mean), 1 for seed "
             f"({s['chattune']['tokens']:,} conversation tokens); 1 step = 4 conversations: seed 4 rows padded "
             f"to 512, trl and chattune 1 packed row of <= {r['pack_length']} tokens"
             + (f" (chattune overrides: {' '.join(r['chattune_overrides'])})" if r["chattune_overrides"] else ""),
             f"   tokens/s: non-pad conversation tokens per second over steps 2..{r['steps']}; "
             f"s/epoch: {r['epoch_conversations']} conversations, {r['epoch_tokens']:,} tokens; val loss: answer "
             f"tokens of {r['val_conversations']} held-out conversations (untrained: {r['base_val_loss']:.4f})", ""]
    rows = [["system", "precision", "tokens", "tokens/s", "loss-tok/s", "s/epoch", "peak RSS MB", "val loss",
             "GFLOP/s", "% peak"]]
    for name in SYSTEMS:
        x = s[name]
        rows.append([name, x["precision"], f"{x['tokens']:,}", f"{x['tokens_per_s']:.0f}",
                     f"{x['loss_tokens_per_s']:.0f}", f"{x['seconds_per_epoch']:.0f}", f"{x['peak_rss_mb']:.0f}",
                     f"{x['val_loss']:.4f}", f"{x['gflops']:.1f}",
                     "n/a" if x["peak_share"] is None else f"{100 * x['peak_share']:.0f}%"])
    lines.append(table(rows))
    mem_ok = s["chattune"]["peak_rss_mb"] <= s["trl"]["peak_rss_mb"]
    lines += ["", f"chattune / seed: {r['vs_seed']:.2f}x (target >= 5x: {'met' if r['vs_seed'] >= 5 else 'NOT met'})   "
              f"chattune / trl: {r['vs_trl']:.2f}x (target >= 1.25x: {'met' if r['vs_trl'] >= 1.25 else 'NOT met'})",
              f"peak RSS chattune <= trl: {'yes' if mem_ok else 'NO'}   val loss chattune <= seed and trl: "
              f"{val_verdict(s)}"]
    if len(r["seeds"]) > 1:
        spread = "; ".join(f"{name} {statistics.fmean(s[name]['val_losses']):.4f} +- "
                           f"{statistics.stdev(s[name]['val_losses']):.4f} ({' '.join(f'{v:.4f}' for v in s[name]['val_losses'])})"
                           for name in ("trl", "chattune"))
        lines.append(f"val loss over training seeds {r['seeds'][0]}..{r['seeds'][-1]} (mean +- sd): {spread}")
    if r["generation"]:
        g = r["generation"]
        plain = g["plain_generate"]["tokens_per_s"]
        lines += ["", f"generation: greedy, {g['new_tokens']} new tokens after a {g['prompt_tokens']}-token prompt, fp32; "
                  f"plain model.generate on the base model: {plain:.1f} tokens/s"]
        rows = [["method", "tokens/s", "vs generate", "KV cache"]]
        for method, x in g["chattune"].items():
            rows.append([method, f"{x['tokens_per_s']:.1f}", f"{x['tokens_per_s'] / plain:.2f}x",
                         "yes" if x["kv_cache"] else "NO"])
        lines.append(table(rows))
    return "\n".join(lines)


def val_gap(s: dict) -> tuple[float, float | None]:
    """chattune's mean validation loss minus TRL's, and the standard error of that difference
    (None with one seed each)."""
    c, t = s["chattune"]["val_losses"], s["trl"]["val_losses"]
    gap = statistics.fmean(c) - statistics.fmean(t)
    if min(len(c), len(t)) < 2:
        return gap, None
    return gap, math.sqrt(statistics.variance(c) / len(c) + statistics.variance(t) / len(t))


def val_verdict(s: dict) -> str:
    """'yes' when chattune's mean validation loss is at most the seed's and TRL's; with several
    seeds a gap to TRL under two standard errors is reported as within noise, not as met."""
    if s["chattune"]["val_loss"] > s["seed"]["val_loss"]:
        return "NO (above the seed recipe)"
    gap, se = val_gap(s)
    if gap <= 0:
        return "yes" if se is None else f"yes (chattune - trl = {gap:+.4f}, standard error {se:.4f})"
    if se is None:
        return f"NO (chattune - trl = {gap:+.4f}; one seed cannot tell this from seed noise: --seeds 5)"
    noise = "within noise" if gap < 2 * se else "NO"
    return f"{noise} (chattune - trl = {gap:+.4f}, standard error {se:.4f})"


def summary_of(r: dict) -> dict:
    s = r["systems"]
    return {"vs_seed": r["vs_seed"], "vs_trl": r["vs_trl"],
            "peak_rss_mb": {k: s[k]["peak_rss_mb"] for k in SYSTEMS}, "val_loss": {k: s[k]["val_loss"] for k in SYSTEMS},
            "val_losses": {k: s[k]["val_losses"] for k in SYSTEMS}, "seeds": r["seeds"],
            "val_gap_chattune_trl": dict(zip(("mean", "standard_error"), val_gap(s))),
            "tokens_per_s": {k: s[k]["tokens_per_s"] for k in SYSTEMS},
            "loss_tokens_per_s": {k: s[k]["loss_tokens_per_s"] for k in SYSTEMS},
            "seconds_per_epoch": {k: s[k]["seconds_per_epoch"] for k in SYSTEMS},
            "gflops": {k: s[k]["gflops"] for k in SYSTEMS}, "peak_share": {k: s[k]["peak_share"] for k in SYSTEMS},
            "precision": {k: s[k]["precision"] for k in SYSTEMS}, "tokens": {k: s[k]["tokens"] for k in SYSTEMS},
            "peak_gpu_mb": {k: s[k]["peak_gpu_mb"] for k in SYSTEMS}, "base_val_loss": r["base_val_loss"],
            "pack_length": r["pack_length"], "trl_settings": r["trl_settings"],
            "chattune_overrides": r["chattune_overrides"],
            "generation": None if not r["generation"] else {
                "plain_generate": r["generation"]["plain_generate"], **r["generation"]["chattune"]}}
