"""Preference pairs: vote-to-pair rules, pair files, prompt-answers pairs, pair rendering."""

from __future__ import annotations

import pytest

from chattune.data import DataConfig
from chattune.data.pairs import load_pairs, prepare_pairs, split_pair
from chattune.data.select import split_of
from chattune.errors import UserError


def by_id(pairs) -> dict:
    return {p["id"]: p for p in pairs.samples}


def answers(p: dict) -> tuple[str, str]:
    return p["chosen"][-1]["content"], p["rejected"][-1]["content"]


def test_votes_become_pairs_with_every_winner_value_and_flag_counted(fixtures):
    pairs = load_pairs(DataConfig(dataset=str(fixtures / "arena_rows.jsonl")))
    kept = by_id(pairs)
    assert answers(kept["r01"]) == ("Rome is the capital of Italy.", "Milan.")  # model_a: a chosen
    assert answers(kept["r02"]) == ("Red is a primary colour.", "Green.")  # model_b: b chosen
    assert set(kept) == {"r01", "r02", "r13", "r16", "r17", "r18"}
    assert pairs.dropped == {"tie": 2, "tie_bothbad": 1, "flagged": 3, "malformed_json": 1, "missing_side": 1,
                             "missing_field": 1, "wrong_type": 1, "unknown_role": 1, "non_alternating": 2,
                             "empty_turn": 1, "unknown_winner": 1, "not_an_object": 1}
    assert pairs.rows_read == pairs.rows_kept + sum(pairs.dropped.values()) == 22
    # --turns first is the pairs' default: the first user turn and the two first answers
    assert kept["r13"]["chosen"] == [{"role": "user", "content": "Give me a fruit."},
                                     {"role": "assistant", "content": "An apple."}]
    for p in kept.values():  # split by the prompt's hash, as SFT: a prompt's battles never straddle splits
        assert p["split"] == split_of(p["chosen"][0]["content"], 0.1, 0.1)


def test_keep_flagged_and_turns_all(fixtures):
    flagged = by_id(load_pairs(DataConfig(dataset=str(fixtures / "arena_rows.jsonl"), keep_flagged=True)))
    assert answers(flagged["r05"]) == ("I can't help with that.", "No.")
    assert answers(flagged["r07"]) == ("Here is a clean one instead.", "No.")  # t5-flagged, model_b
    pairs = load_pairs(DataConfig(dataset=str(fixtures / "arena_rows.jsonl"), turns="all"))
    r13 = by_id(pairs)["r13"]
    assert len(r13["chosen"]) == 4 and len(r13["rejected"]) == 4  # the trailing unanswered question dropped
    assert answers(r13) == ("A pear.", "Kiwi.")


def test_pair_files_strings_messages_and_bad_pairs(fixtures):
    cfg = dict(dataset=str(fixtures / "pair_rows.jsonl"))
    pairs = load_pairs(DataConfig(**cfg))
    kept = by_id(pairs)
    assert pairs.format == "pairs"
    assert answers(kept["q1"]) == ("Rome.", "Milan.")
    assert kept["q1"]["chosen"][0] == {"role": "user", "content": "What is the capital of Italy?"}
    assert answers(kept["q2"]) == ("Red is one.", "Green.")
    assert answers(kept["q3"]) == ("An apple.", "Banana.")  # whole conversations, first turn compared
    assert pairs.dropped == {"chosen_equals_rejected": 1, "empty_turn": 1, "missing_field": 2}
    assert set(kept) == {"q1", "q2", "q3", "q8"}
    # all turns: q3's second user turns differ, so the two answers do not answer the same thing
    pairs = load_pairs(DataConfig(**cfg, turns="all"))
    assert "q3" not in by_id(pairs) and pairs.dropped["user_turns_differ"] == 1


def test_prompt_that_alone_exceeds_max_length_is_dropped_and_counted(fixtures, tiny_tokenizer):
    data = prepare_pairs(DataConfig(dataset=str(fixtures / "pair_rows.jsonl"), max_length=64, val_ratio=0,
                                    test_ratio=0), tiny_tokenizer)
    assert data.token_dropped == {"prompt_too_long": 1}
    assert sorted(s["id"] for s in data.splits["train"]) == ["q1", "q2", "q3"]
    for s in data.splits["train"]:
        chosen, rejected = split_pair(s)
        assert len(chosen["input_ids"]) == s["segments"][0] and len(rejected["input_ids"]) == s["segments"][1]
        assert chosen["labels"][0] == rejected["labels"][0] == -100  # a segment never predicts across a boundary
        assert chosen["input_ids"] != rejected["input_ids"]


def test_no_pair_left_names_the_reasons(fixtures, tiny_tokenizer):
    cfg = DataConfig(dataset=str(fixtures / "pair_rows.jsonl"), max_length=8, val_ratio=0, test_ratio=0)
    with pytest.raises(UserError, match="no training pairs left from 8 rows; dropped: prompt_too_long 4"):
        prepare_pairs(cfg, tiny_tokenizer)
    cfg = DataConfig(dataset=str(fixtures / "pair_rows.jsonl"), max_length=64, val_ratio=0, test_ratio=0)
    stats = prepare_pairs(cfg, tiny_tokenizer).stats()
    assert stats["pairs"]["rows_read"] == 8 and stats["pairs"]["token_dropped"] == {"prompt_too_long": 1}
    assert stats["train"]["samples"] == 3


def test_prompt_answers_pairs_need_both_models(fixtures):
    cfg = dict(dataset=str(fixtures / "prompt_answers.jsonl"))
    pairs = load_pairs(DataConfig(**cfg, chosen_model="model-x", rejected_model="model-y"))
    assert answers(by_id(pairs)["p1"]) == ("Soft rain on the roof / ...", "Rain falls.")
    assert pairs.rows_kept == 2 and pairs.dropped == {"missing_answer": 1}
    with pytest.raises(UserError, match="both --chosen-model and --rejected-model"):
        load_pairs(DataConfig(**cfg, chosen_model="model-x"))


def test_single_conversation_formats_are_not_pairs(fixtures):
    with pytest.raises(UserError, match="two answers per prompt"):
        load_pairs(DataConfig(dataset=str(fixtures / "messages.jsonl")))


def test_pair_rows_train_sft_on_the_chosen_answer(fixtures):
    from chattune.data import load_conversations

    convs = load_conversations(DataConfig(dataset=str(fixtures / "pair_rows.jsonl")))
    kept = {s["id"]: s for s in convs.samples}
    assert kept["q1:a"]["messages"][-1]["content"] == "Rome."


def test_arena_hard_pairs(shared_data):
    pairs = load_pairs(DataConfig(dataset=str(shared_data / "arena_hard_v0.1.jsonl"), chosen_model="gpt-4-0314",
                                  rejected_model="gpt-3.5-turbo-0125"))
    assert pairs.rows_read == 500
    assert pairs.rows_kept + sum(pairs.dropped.values()) == 500 and pairs.rows_kept > 450
