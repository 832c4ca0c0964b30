"""Preference pairs: the data stages of SFT (load -> select -> render) with a pair-shaped
selection and render step.

A pair is one prompt with a chosen and a rejected answer. Sources, cleaning, bounds,
de-duplication and the prompt-hash split are SFT's own functions; what differs is which
rows make a pair:

- arena rows: the vote's winner is chosen, the loser rejected; ``tie`` and
  ``tie (bothbad)`` say nothing about which answer is better and are dropped under their
  own reasons, unless ``ties`` keeps a ``tie`` as a tie pair (side a then side b,
  ``"tie": True``) for DPO's tie models (``chattune.training.ties``); flagged rows are
  dropped as in SFT;
- ``--turns first`` (the default for pairs) compares the first answers to the first user
  turn; ``--turns all`` compares both whole conversations when their user turns are
  identical (different user turns: dropped as ``user_turns_differ``);
- pair files and prompt-answers rows parse as arena rows voted for side "a"
  (``chattune.data.sources``).

A rendered pair is one sample: the chosen conversation's tokens followed by the
rejected one's, ``segments`` giving the two lengths. Batch plans and token budgets then
treat a pair as one unit of ``sum(segments)`` tokens, so both answers always land in the
same micro-batch; ``chattune.training.objectives`` splits them again at collation.
"""

from __future__ import annotations

from collections import Counter

from transformers import PreTrainedTokenizerBase

from chattune.data.config import DataConfig
from chattune.data.render import PreparedData, _tokenize
from chattune.data.select import WINNER_SIDES, ConversationSet, Drop, check_row, _duplicate, _out_of_bounds, clean_turns, \
    load_conversations, split_of
from chattune.data.sources import BadRow, Row
from chattune.errors import UserError

# Votes that say nothing about which answer is better, and their counter keys.
NO_PREFERENCE = {"tie": "tie", "tie (bothbad)": "tie_bothbad"}
NOT_PAIRS = ("preference objectives need two answers per prompt: arena votes, {prompt, chosen, rejected} rows, "
             "or prompt-answers rows with --chosen-model and --rejected-model")


def pair_samples(row: Row, cfg: DataConfig, seen: set[bytes], ties: bool = False) -> tuple[list[dict], Counter]:
    """The pair of one row, ``{"id", "chosen", "rejected", "split", "tie"}``; raises BadRow or Drop."""
    if list(row.sides) == [None]:
        raise UserError(NOT_PAIRS)
    if row.winner is None:
        raise BadRow("missing_field", "no 'winner'")
    if not isinstance(row.winner, str) or row.winner not in WINNER_SIDES:
        raise BadRow("unknown_winner", f"winner {row.winner!r}")
    tie = ties and row.winner == "tie"
    if row.winner in NO_PREFERENCE and not tie:
        raise Drop(NO_PREFERENCE[row.winner])
    good, bad = ("b", "a") if row.winner == "model_b" else ("a", "b")
    check_row(row, cfg, (good, bad))
    turns = cfg.turns or "first"
    chosen, rejected = clean_turns(row.sides[good], turns), clean_turns(row.sides[bad], turns)
    if [m for m in chosen if m["role"] == "user"] != [m for m in rejected if m["role"] == "user"]:
        raise Drop("user_turns_differ")
    if chosen == rejected:
        raise Drop("chosen_equals_rejected")  # a tie between equal answers teaches nothing either
    reason = _out_of_bounds(chosen, cfg) or _out_of_bounds(rejected, cfg)
    reason = reason or (_duplicate(chosen + rejected, seen) if cfg.dedup else None)
    if reason:
        raise Drop(reason)
    split = split_of(chosen[0]["content"], cfg.val_ratio, cfg.test_ratio)
    return [{"id": row.id, "chosen": chosen, "rejected": rejected, "split": split, "tie": tie}], Counter()


def load_pairs(cfg: DataConfig, ties: bool = False) -> ConversationSet:
    """Read ``cfg.dataset`` and select preference pairs (``ties``: keep ``tie`` votes as tie
    pairs); every row not kept is counted by reason."""
    return load_conversations(cfg, row_samples=lambda row, cfg, seen: pair_samples(row, cfg, seen, ties))


def pair_sample(pair_id: str, chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]],
                tie: bool = False) -> dict:
    """One training sample of a pair: chosen then rejected tokens, ``segments`` their lengths;
    a tie pair's two answers are equally good and carry ``"tie": True``."""
    sample = {"id": pair_id, "input_ids": chosen[0] + rejected[0], "labels": chosen[1] + rejected[1],
              "segments": [len(chosen[0]), len(rejected[0])]}
    return sample | {"tie": True} if tie else sample


def split_pair(sample: dict) -> list[dict]:
    """The chosen and the rejected conversation of a pair sample, as SFT samples."""
    n = sample["segments"][0]
    return [{"input_ids": sample["input_ids"][:n], "labels": sample["labels"][:n]},
            {"input_ids": sample["input_ids"][n:], "labels": sample["labels"][n:]}]


class PairData(PreparedData):
    """Tokenised pairs per split; ``stats()`` also accounts for every row that made no pair."""

    def stats(self) -> dict[str, dict]:
        pairs = self.conversations
        return {**super().stats(), "pairs": {"rows_read": pairs.rows_read, "rows_kept": pairs.rows_kept,
                                             "dropped": dict(pairs.dropped), "token_dropped": dict(self.token_dropped)}}

    def votes(self) -> dict:
        """What every row became: decided and tie pairs (after tokenisation), dropped by reason."""
        kept = Counter("tie_pairs" if s.get("tie") else "decided_pairs" for split in self.splits.values() for s in split)
        return vote_account(self.conversations, kept, self.token_dropped)


def vote_account(rows: ConversationSet, became: Counter, token_dropped: Counter) -> dict:
    """``rows_read`` split into what the rows became (pairs, or KTO's examples: two per vote) and
    why the others were dropped: whole rows, single sides of kept rows, samples at tokenisation."""
    return {"rows_read": rows.rows_read, "rows_kept": rows.rows_kept, "became": dict(sorted(became.items())),
            "dropped": dict(rows.dropped.most_common()), "sides_dropped": dict(rows.samples_dropped.most_common()),
            "dropped_at_tokenisation": dict(token_dropped)}


def prepare_pairs(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, ties: bool = False) -> PairData:
    """Load, select and tokenise pairs; each answer fits ``cfg.max_length`` on its own.

    A pair whose prompt alone fills ``max_length`` (no answer token fits), or whose two
    answers are identical once cut to fit, is dropped and counted in ``token_dropped``.
    """
    pairs = load_pairs(cfg, ties)
    data = PairData(pairs, {"train": [], "validation": [], "test": []})
    for pair in pairs.samples:
        chosen, rejected = _tokenize(pair["chosen"], tokenizer, cfg), _tokenize(pair["rejected"], tokenizer, cfg)
        if chosen is None or rejected is None:
            data.token_dropped["prompt_too_long"] += 1
            continue
        if chosen[0] == rejected[0]:
            data.token_dropped["chosen_equals_rejected_after_truncation"] += 1
            continue
        data.truncated[pair["split"]] += chosen[2] or rejected[2]
        data.splits[pair["split"]].append(pair_sample(pair["id"], chosen, rejected, pair["tie"]))
    if not data.splits["train"]:
        lost = (pairs.dropped + data.token_dropped).most_common()
        raise UserError(f"no training pairs left from {pairs.rows_read} rows; dropped: "
                        + (", ".join(f"{k} {v}" for k, v in lost) or "none"))
    return data
