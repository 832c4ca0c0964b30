"""Every vote counted: tie pairs for DPO, KTO's desirable/undesirable answers (bothbad -> two
undesirable), the unpaired {prompt, completion, label} format, and `chattune data --objective`."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from chattune.cli import main
from chattune.data import DataConfig, load_conversations
from chattune.data.pairs import load_pairs, prepare_pairs
from chattune.data.votes import load_kto, mismatched_partner, prepare_kto


def write(tmp_path, rows, name="rows.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def arena(qid, winner, a="Answer A is here.", b="Answer B is here.", prompt="What is a good answer?"):
    return {"question_id": qid, "winner": winner, "model_a": "x", "model_b": "y",
            "conversation_a": [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}],
            "conversation_b": [{"role": "user", "content": prompt}, {"role": "assistant", "content": b}]}


def test_kto_examples_from_every_kind_of_vote(fixtures):
    c = load_kto(DataConfig(dataset=str(fixtures / "arena_rows.jsonl")))
    got = {s["id"]: (s["label"], s["vote"]) for s in c.samples}
    assert got["r01:a"] == (True, "decided") and got["r01:b"] == (False, "decided")  # model_a wins
    assert got["r02:b"] == (True, "decided") and got["r02:a"] == (False, "decided")  # model_b wins
    assert got["r03:a"] == got["r03:b"] == (True, "tie")  # a tie: both desirable
    assert got["r04:a"] == got["r04:b"] == (False, "tie_bothbad")  # both bad: both undesirable
    assert c.samples_dropped == Counter({"duplicate": 2})  # single answers already seen, counted
    assert c.rows_read == c.rows_kept + sum(c.dropped.values()) == 22


def test_tie_pairs_are_kept_only_when_asked_and_every_row_is_accounted_for(fixtures, tiny_tokenizer):
    cfg = DataConfig(dataset="sample", max_length=128)
    dropped, kept = prepare_pairs(cfg, tiny_tokenizer).votes(), prepare_pairs(cfg, tiny_tokenizer, ties=True).votes()
    assert "tie_pairs" not in dropped["became"] and dropped["dropped"]["tie"] == 11
    assert kept["became"]["tie_pairs"] == 10 and "tie" not in kept["dropped"]  # 11 ties, one flagged
    assert kept["became"]["decided_pairs"] == dropped["became"]["decided_pairs"]
    for v in (dropped, kept):  # no vote disappears: every row read is a pair or a counted drop
        assert v["rows_read"] == 61 == (sum(v["became"].values()) + sum(v["dropped"].values())
                                        + sum(v["dropped_at_tokenisation"].values()))
    ties = load_pairs(DataConfig(dataset=str(fixtures / "arena_rows.jsonl")), ties=True)
    assert {p["id"]: p["tie"] for p in ties.samples}["r03"] is True
    assert ties.dropped["tie_bothbad"] == 1 and "tie" not in ties.dropped


def test_bothbad_votes_become_two_undesirable_examples_counted_under_their_own_reason(tmp_path, tiny_tokenizer):
    rows = [arena("d", "model_b"), arena("t", "tie", prompt="Tie?"), arena("bb", "tie (bothbad)", prompt="Bad?")]
    data = prepare_kto(DataConfig(dataset=write(tmp_path, rows), max_length=128, val_ratio=0, test_ratio=0),
                       tiny_tokenizer)
    v = data.votes()
    assert v["became"] == {"decided_desirable": 1, "decided_undesirable": 1, "tie_desirable": 2,
                           "tie_bothbad_undesirable": 2}
    bothbad = [s for s in data.splits["train"] if s["vote"] == "tie_bothbad"]
    assert [s["label"] for s in bothbad] == [False, False]


def test_each_example_carries_another_prompts_answer_as_its_mismatched_segment(tmp_path, tiny_tokenizer):
    rows = [arena("p1", "model_a", "One.", "Two.", "First prompt?"), arena("p2", "model_b", "Three.", "Four.", "Second?")]
    data = prepare_kto(DataConfig(dataset=write(tmp_path, rows), max_length=128, val_ratio=0, test_ratio=0),
                       tiny_tokenizer)
    for s in data.splits["train"]:
        n = s["segments"][0]
        own, other = tiny_tokenizer.decode(s["input_ids"][:n]), tiny_tokenizer.decode(s["input_ids"][n:])
        prompt = "First prompt?" if "First prompt?" in own else "Second?"
        assert prompt in other  # same prompt ...
        answers = {"First prompt?": ("One.", "Two."), "Second?": ("Three.", "Four.")}
        assert not any(a in other for a in answers[prompt])  # ... with an answer to another prompt
    assert mismatched_partner(["a", "a", "b"], 0) == 2 and mismatched_partner(["a", "a"], 1) == 1


def test_unpaired_rows(tmp_path):
    rows = [{"prompt": "Hi?", "completion": "Hello! How can I help?", "label": True},
            {"prompt": "Hi?", "completion": "Go away.", "label": False},
            {"prompt": [{"role": "user", "content": "Sum 2+2?"}],
             "completion": [{"role": "assistant", "content": "4"}], "label": True},
            {"prompt": "Hi?", "completion": "Yes.", "label": "yes"},  # not a boolean
            {"completion": "No prompt.", "label": True}]
    path = write(tmp_path, rows)
    c = load_kto(DataConfig(dataset=path))
    assert c.format == "unpaired"
    assert [s["label"] for s in c.samples] == [True, False, True] and {s["vote"] for s in c.samples} == {"unpaired"}
    assert c.dropped == Counter({"wrong_type": 1, "missing_field": 1})
    sft = load_conversations(DataConfig(dataset=path))  # SFT imitates thumbs-up answers only
    assert len(sft.samples) == 2 and sft.dropped["undesirable_answer"] == 1


def test_single_conversations_are_no_kto_data(fixtures):
    with pytest.raises(Exception, match="kto needs labelled answers"):
        load_kto(DataConfig(dataset=str(fixtures / "messages.jsonl")))


@pytest.mark.parametrize("argv, expect", [
    (["--objective", "dpo"], "61 rows became decided_pairs 38"),
    (["--objective", "dpo", "--ties", "rao-kupper"], "decided_pairs 38, tie_pairs 10"),
    (["--objective", "kto"], "decided_desirable 38, decided_undesirable 38, tie_bothbad_undesirable 16, "
                             "tie_desirable 20"),
])
def test_data_command_says_what_every_vote_became(capsys, argv, expect):
    assert main(["data", *argv]) == 0
    out = capsys.readouterr().out
    assert expect in out and "dropped: rows" in out


def test_data_command_ties_need_dpo(capsys):
    assert main(["data", "--objective", "kto", "--ties", "davidson"]) == 2
    assert "--ties applies to --objective dpo" in capsys.readouterr().err
