"""KTO examples: every vote's answers as single desirable or undesirable answers.

KTO (Ethayarajh et al. 2024) learns from one answer at a time with a thumbs up or down, so
every arena vote teaches, ties and "both bad" included:

- ``model_a`` / ``model_b``: the winner's answer desirable, the loser's undesirable;
- ``tie``: both answers desirable (equally good);
- ``tie (bothbad)``: both answers **undesirable**, neither should become more likely;
- pair rows (``{prompt, chosen, rejected}``, prompt-answers with two models): chosen
  desirable, rejected undesirable;
- unpaired rows ``{"prompt", "completion", "label"}`` (TRL's unpaired format): one answer,
  desirable when ``label`` is true.

Each side is cleaned, bounded and de-duplicated as SFT's sides are (a side dropped inside a
kept row is counted in ``samples_dropped``); both sides of a vote share their prompt and so
their split.

A rendered example is a two-segment sample like a pair: the answer to its own prompt, then
the same prompt with the answer of another example (the next one in the split whose prompt
differs). The second segment is KTO's mismatched pair for the reference point z0, fixed
when the data is prepared, as TRL's ``KTOTrainer`` fixes it (its KL completions are the
dataset's completions shifted by one within each ``map`` batch, before shuffling). So the
pairs' batching, packing, collation and precomputed reference serve KTO unchanged.
"""

from __future__ import annotations

from collections import Counter

from transformers import PreTrainedTokenizerBase

from chattune.data.config import DataConfig
from chattune.data.pairs import PairData, pair_sample, vote_account
from chattune.data.render import _tokenize
from chattune.data.select import WINNER_SIDES, ConversationSet, Drop, _duplicate, _out_of_bounds, check_row, \
    clean_turns, load_conversations, split_of
from chattune.data.sources import BadRow, Row
from chattune.errors import UserError

# vote -> (kind, {side: desirable}); the winner's side comes first
VOTES = {"model_a": ("decided", {"a": True, "b": False}), "model_b": ("decided", {"b": True, "a": False}),
         "tie": ("tie", {"a": True, "b": True}), "tie (bothbad)": ("tie_bothbad", {"a": False, "b": False})}
NOT_LABELLED = ("kto needs labelled answers: arena votes, {prompt, chosen, rejected} rows, prompt-answers rows "
                "with --chosen-model and --rejected-model, or {prompt, completion, label} rows")


def _labelled_sides(row: Row) -> tuple[str, dict]:
    if list(row.sides) == [None]:
        if row.label is None:
            raise UserError(NOT_LABELLED)
        return "unpaired", {None: row.label}
    if row.winner is None:
        raise BadRow("missing_field", "no 'winner'")
    if not isinstance(row.winner, str) or row.winner not in WINNER_SIDES:
        raise BadRow("unknown_winner", f"winner {row.winner!r}")
    return VOTES[row.winner]


def kto_samples(row: Row, cfg: DataConfig, seen: set[bytes]) -> tuple[list[dict], Counter]:
    """The examples of one row, ``{"id", "messages", "split", "label", "vote"}``; raises BadRow or Drop."""
    kind, labels = _labelled_sides(row)
    check_row(row, cfg, list(labels))
    samples, misses = [], Counter()
    for side, label in labels.items():
        messages = clean_turns(row.sides[side], cfg.turns or "first")
        reason = _out_of_bounds(messages, cfg) or (_duplicate(messages, seen) if cfg.dedup else None)
        if reason:
            misses[reason] += 1
            continue
        samples.append({"id": row.id if side is None else f"{row.id}:{side}", "messages": messages, "label": label,
                        "split": split_of(messages[0]["content"], cfg.val_ratio, cfg.test_ratio), "vote": kind})
    if not samples:
        raise Drop(next(iter(misses)))
    return samples, misses


def load_kto(cfg: DataConfig) -> ConversationSet:
    """Read ``cfg.dataset`` and select KTO examples; every row and side not kept is counted."""
    return load_conversations(cfg, row_samples=kto_samples)


def mismatched_partner(prompts: list[str], i: int) -> int:
    """The next example after ``i`` (cyclically) whose prompt differs; ``i`` itself when none does."""
    n = len(prompts)
    return next(((i + k) % n for k in range(1, n) if prompts[(i + k) % n] != prompts[i]), i)


class KtoData(PairData):
    """Tokenised KTO examples per split; ``votes()`` says what every row became."""

    def votes(self) -> dict:
        became = Counter(f"{s['vote']}_{'desirable' if s['label'] else 'undesirable'}"
                         for split in self.splits.values() for s in split)
        return vote_account(self.conversations, became, self.token_dropped)


def prepare_kto(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> KtoData:
    """Load, select and tokenise KTO examples, each with its mismatched partner's answer.

    Samples are pair samples (``segments``: own answer, mismatched answer) plus ``label``
    (True: desirable) and ``vote`` (decided, tie, tie_bothbad or unpaired).
    """
    rows = load_kto(cfg)
    data = KtoData(rows, {"train": [], "validation": [], "test": []})
    by_split: dict[str, list[tuple[dict, tuple]]] = {"train": [], "validation": [], "test": []}
    for ex in rows.samples:
        own = _tokenize(ex["messages"], tokenizer, cfg)
        if own is None:
            data.token_dropped["prompt_too_long"] += 1
            continue
        by_split[ex["split"]].append((ex, own))
    for split, items in by_split.items():
        prompts = [str(ex["messages"][:-1]) for ex, _ in items]
        for i, (ex, own) in enumerate(items):
            other = items[mismatched_partner(prompts, i)][0]["messages"][-1]
            # the partner's answer fits whenever the prompt does; cut like any answer otherwise
            mismatched = _tokenize(ex["messages"][:-1] + [other], tokenizer, cfg)
            data.truncated[split] += own[2]
            sample = pair_sample(ex["id"], own, mismatched)
            data.splits[split].append(sample | {"label": ex["label"], "vote": ex["vote"]})
    if not data.splits["train"]:
        lost = (rows.dropped + data.token_dropped).most_common()
        raise UserError(f"no training examples left from {rows.rows_read} rows; dropped: "
                        + (", ".join(f"{k} {v}" for k, v in lost) or "none"))
    return data
