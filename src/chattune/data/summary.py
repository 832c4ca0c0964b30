"""What `chattune data` reports: counts, drop reasons, token statistics, marked samples."""

from __future__ import annotations

import dataclasses
import random

from chattune.data.config import DataConfig
from chattune.data.render import IGNORE_INDEX, PreparedData, seed_turns
from chattune.data.select import ConversationSet

SPLITS = ("train", "validation", "test")


def summary_dict(cfg: DataConfig, conversations: ConversationSet, prepared: PreparedData | None = None,
                 tokenizer_name: str | None = None) -> dict:
    """The JSON summary: rows read/kept/dropped, samples per split, token counts when tokenised."""
    splits = dict.fromkeys(SPLITS, 0)
    for s in conversations.samples:
        splits[s["split"]] += 1
    out = {
        "source": conversations.source, "format": conversations.format,
        "rows_read": conversations.rows_read, "rows_kept": conversations.rows_kept,
        "dropped": dict(conversations.dropped.most_common()),
        "samples": len(conversations.samples), "samples_dropped": dict(conversations.samples_dropped.most_common()),
        "splits": splits, "config": dataclasses.asdict(cfg),
    }
    if prepared is not None:
        out["tokenizer"] = tokenizer_name
        out["template"] = prepared.template
        out["tokens"] = prepared.stats()
        out["token_dropped"] = dict(prepared.token_dropped)
    return out


def _counts(counter: dict) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counter.items()) or "none"


def format_summary(summary: dict) -> str:
    """The readable version of ``summary_dict``."""
    s = summary
    lines = [
        f"source     {s['source']} ({s['format']} rows)",
        f"rows       {s['rows_read']} read, {s['rows_kept']} kept, {s['rows_read'] - s['rows_kept']} dropped",
        f"dropped    {_counts(s['dropped'])}",
        f"samples    {s['samples']}: " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()),
    ]
    if s["samples_dropped"]:
        lines.append(f"           sides dropped inside kept rows: {_counts(s['samples_dropped'])}")
    if "votes" in s:
        v = s["votes"]
        lines.append(f"votes      {s['objective']}: {v['rows_read']} rows became {_counts(v['became'])}")
        lines.append(f"           dropped: rows {_counts(v['dropped'])}; sides {_counts(v['sides_dropped'])}; "
                     f"at tokenisation {_counts(v['dropped_at_tokenisation'])}")
    if "tokens" in s:
        cfg = s["config"]
        lines.append(f"tokens     tokenizer {s['tokenizer']}, template {s['template']}, max_length {cfg['max_length']}"
                     + (", loss on prompts too" if cfg["train_on_prompt"] else ""))
        lines.append(f"           {'split':<11}{'samples':>8}{'tokens':>10}{'loss':>10}{'share':>7}"
                     f"{'median':>8}{'p95':>6}{'cut':>6}")
        for name, t in s["tokens"].items():
            if name not in SPLITS:
                continue  # pair data also reports its row account here; the votes line says it
            lines.append(f"           {name:<11}{t['samples']:>8}{t['tokens']:>10}{t['loss_tokens']:>10}"
                         f"{100 * t['loss_share']:>6.1f}%{t['median_length']:>8.0f}{t['p95_length']:>6}"
                         f"{t['truncated']:>6}")
        if s["token_dropped"]:
            lines.append(f"           dropped at tokenisation: {_counts(s['token_dropped'])}")
    return "\n".join(lines)


def pick(n: int, total: int, seed: int) -> list[int]:
    """``n`` distinct indices out of ``total``, the same for the same seed."""
    return sorted(random.Random(seed).sample(range(total), min(n, total)))


def marked_tokens(ids: list[int], labels: list[int], tokenizer, marks: tuple[str, str]) -> str:
    """Decoded text with each run of loss-bearing tokens wrapped in ``marks``."""
    out, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(f"{marks[0]}{text}{marks[1]}" if labels[start] != IGNORE_INDEX else text)
            start = end
    return "".join(out)


def marked_text(messages: list[dict], marks: tuple[str, str]) -> str:
    """The seed rendering without a tokenizer: answers and their EOS marked, EOS shown as <EOS>."""
    out = []
    for prompt, answer in seed_turns(messages, "<EOS>"):
        out += [text for text, _ in prompt]
        out.append(marks[0] + "".join(text for text, _ in answer) + marks[1])
    return "".join(out)
