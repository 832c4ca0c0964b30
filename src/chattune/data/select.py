"""Arena-aware selection: which side, which turns, which rows; clean-up, de-duplication, split.

Written by hand because no library knows the arena's vote, its moderation tags or its
two-sided rows. Every row read ends either kept (it produced at least one sample) or
dropped under exactly one reason, so ``rows_read == rows_kept + sum(dropped.values())``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from chattune.data.config import DataConfig
from chattune.data.sources import BadRow, Row, open_source
from chattune.errors import UserError
from chattune.data.textstats import is_loop

WINNER_SIDES = {"model_a": ["a"], "model_b": ["b"], "tie": ["a", "b"], "tie (bothbad)": []}


class Drop(Exception):
    """A row filtered out on purpose (not bad input); ``reason`` is its counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ConversationSet:
    """The selected conversations and the account of everything that was not kept.

    ``samples`` are dicts ``{"id", "messages", "split", "side"}``; ``dropped`` counts
    dropped rows by reason, ``samples_dropped`` the sides dropped inside kept rows.
    """

    source: str = ""
    format: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    samples_dropped: Counter = field(default_factory=Counter)
    samples: list[dict] = field(default_factory=list)


def load_conversations(cfg: DataConfig, row_samples=None) -> ConversationSet:
    """Read ``cfg.dataset`` and select conversations as ``cfg`` says.

    Args:
        cfg: the data configuration.
        row_samples: ``(row, cfg, seen) -> (samples, misses)``, raising BadRow or Drop;
            SFT's selection by default (``chattune.data.pairs`` passes its pair rules).

    Returns:
        The kept samples with their split, and counters for every row not kept.

    Raises:
        UserError: the source cannot be read, or (with ``cfg.strict``) a row is bad input.
    """
    source = open_source(cfg)
    out = ConversationSet(source=source.name, format=source.format)
    seen: set[bytes] = set()
    row_samples = row_samples or _row_samples
    for where, row in source.rows:
        out.rows_read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            samples, misses = row_samples(row, cfg, seen)
        except BadRow as bad:
            if cfg.strict:
                raise UserError(f"{where}: {bad} (drop --strict to count and skip such rows)") from None
            out.dropped[bad.reason] += 1
            continue
        except Drop as drop:
            out.dropped[drop.reason] += 1
            continue
        out.rows_kept += 1
        out.samples.extend(samples)
        out.samples_dropped.update(misses)
    return out


def check_row(row: Row, cfg: DataConfig, sides) -> None:
    """The row-level rules every selection applies: raises BadRow or Drop for the row."""
    for side in sides:  # bad input on a used side is checked before any filter
        if isinstance(row.sides[side], BadRow):
            raise row.sides[side]
    if row.flagged and not cfg.keep_flagged:
        raise Drop("flagged")
    if cfg.language and (row.language or "").casefold() != cfg.language.casefold():
        raise Drop("language")


def _row_samples(row: Row, cfg: DataConfig, seen: set[bytes]) -> tuple[list[dict], Counter]:
    """The samples of one row and the sides dropped inside it; raises BadRow or Drop for the row."""
    if row.label is False:
        raise Drop("undesirable_answer")  # a thumbs-down answer is nothing to imitate
    sides = _used_sides(row, cfg)
    conversations = {}
    check_row(row, cfg, sides)
    for side in sides:
        conversations[side] = clean_turns(row.sides[side], cfg.turns)
    samples, misses = [], Counter()
    for side, messages in conversations.items():
        reason = (_out_of_bounds(messages, cfg) or _looping(messages, cfg.max_answer_repetition)
                  or (_duplicate(messages, seen) if cfg.dedup else None))
        if reason:
            misses[reason] += 1
            continue
        sample_id = row.id if side is None else f"{row.id}:{side}"
        split = split_of(messages[0]["content"], cfg.val_ratio, cfg.test_ratio)
        samples.append({"id": sample_id, "messages": messages, "split": split, "side": side})
    if not samples:
        raise Drop(next(iter(misses)))
    return samples, misses


def _used_sides(row: Row, cfg: DataConfig) -> list:
    if list(row.sides) == [None]:
        return [None]  # only arena rows have sides and a vote
    if cfg.side != "winner":
        return ["a", "b"] if cfg.side == "both" else [cfg.side]
    if row.winner is None:
        raise BadRow("missing_field", "no 'winner' (needed by --side winner)")
    if not isinstance(row.winner, str) or row.winner not in WINNER_SIDES:
        raise BadRow("unknown_winner", f"winner {row.winner!r}")
    if not WINNER_SIDES[row.winner]:
        raise Drop("tie_bothbad")
    return WINNER_SIDES[row.winner]


def clean_turns(messages: list[dict], turns: str) -> list[dict]:
    """Strict user/assistant alternation ending on an answer, stripped text; raises Drop."""
    if turns == "first":
        messages = messages[:2]
    if any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(messages)):
        raise Drop("non_alternating")
    if messages and messages[-1]["role"] == "user":
        messages = messages[:-1]  # a question nobody answered teaches nothing
    if not messages:
        raise Drop("no_answer")
    if any(not m["content"].strip() for m in messages):
        raise Drop("empty_turn")
    return [{"role": m["role"], "content": m["content"].strip()} for m in messages]


def _out_of_bounds(messages: list[dict], cfg: DataConfig) -> str | None:
    for m in messages:
        kind = "prompt" if m["role"] == "user" else "response"
        low, high = getattr(cfg, f"min_{kind}_chars"), getattr(cfg, f"max_{kind}_chars")
        if low is not None and len(m["content"]) < low:
            return f"{kind}_too_short"
        if high is not None and len(m["content"]) > high:
            return f"{kind}_too_long"
    return None


def _looping(messages: list[dict], threshold: float) -> str | None:
    """'looping_answer' when more than ``threshold`` of an answer lies inside a span repeated
    back to back (``chattune.data.textstats.loop_share``: a loop, not a list, table or code).

    The whole conversation goes, not only the turns from the looping answer on: it is one
    sample, the later turns read the loop as context, and a drop is counted with one
    reason where a cut would change a kept sample unseen. Words and punctuation, not model
    tokens: the data step is tokenizer-free, and the eval measures the same text.
    """
    if threshold <= 0 or threshold >= 1:  # off; no answer lies more than wholly inside a loop
        return None
    for m in messages:
        if m["role"] == "assistant" and is_loop(m["content"], threshold):
            return "looping_answer"
    return None


def _duplicate(messages: list[dict], seen: set[bytes]) -> str | None:
    # Same turns and same text. Two sides sharing a prompt differ in their answers, so
    # they are not duplicates of each other.
    key = hashlib.sha1(json.dumps(messages, ensure_ascii=False).encode()).digest()
    if key in seen:
        return "duplicate"
    seen.add(key)
    return None


def split_of(first_prompt: str, val_ratio: float, test_ratio: float) -> str:
    """train/validation/test from a stable hash of the first user prompt.

    hashlib, not ``hash()``: Python's string hash changes with every process, and the
    same prompt must land in the same split on every run and never in two splits.
    """
    digest = hashlib.sha256(first_prompt.strip().encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_ratio:
        return "test"
    if u < test_ratio + val_ratio:
        return "validation"
    return "train"
