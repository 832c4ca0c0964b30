"""The looping-answer filter (the loop detector of data/textstats.py) and the seq-rep-n statistic."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from chattune.data import DataConfig, load_conversations
from chattune.errors import UserError
from chattune.data.textstats import repeated_ngram_rate

LOOP = "A doctor treats a patient. " * 12  # 60 words, 57 4-grams of which 5 are distinct
FINE = "Python is a programming language created by Guido van Rossum and first released in 1991."


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write(tmp_path, rows) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_repeated_ngram_rate():
    assert repeated_ngram_rate("a b c d a b c d".split()) == pytest.approx(1 / 5)  # abcd seen twice of 5
    assert repeated_ngram_rate(FINE.split()) == 0.0
    assert repeated_ngram_rate(LOOP.split()) == pytest.approx(1 - 5 / 57)
    assert repeated_ngram_rate(["a", "a", "a"]) == 0.0  # shorter than one 4-gram
    assert repeated_ngram_rate([1, 2, 1, 2, 1], n=2) == pytest.approx(2 / 4)


def test_a_looping_answer_drops_its_whole_conversation(tmp_path):
    rows = [
        {"id": "ok", "messages": [user("What is Python?"), bot(FINE)]},
        {"id": "loop", "messages": [user("Tell me about doctors."), bot(LOOP)]},
        # the loop is in the second answer: the first, good pair goes too (one sample, one reason)
        {"id": "late", "messages": [user("Hi"), bot(FINE), user("And doctors?"), bot(LOOP)]},
    ]
    c = load_conversations(DataConfig(dataset=write(tmp_path, rows)))
    assert [s["id"] for s in c.samples] == ["ok"]
    assert c.dropped == Counter({"looping_answer": 2})
    assert c.rows_read == c.rows_kept + sum(c.dropped.values())


def test_a_looping_prompt_is_not_filtered(tmp_path):
    rows = [{"id": "p", "messages": [user(LOOP), bot(FINE)]}]
    assert len(load_conversations(DataConfig(dataset=write(tmp_path, rows))).samples) == 1


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_zero_or_one_switches_the_filter_off(tmp_path, threshold):
    rows = [{"id": "loop", "messages": [user("Tell me about doctors."), bot(LOOP)]}]
    c = load_conversations(DataConfig(dataset=write(tmp_path, rows), max_answer_repetition=threshold))
    assert [s["id"] for s in c.samples] == ["loop"] and not c.dropped


def test_threshold_is_strict(tmp_path):
    answer = "alpha beta gamma delta epsilon zeta eta theta iota kappa" + " go" * 15  # 15 of 25 pieces loop
    rows = [{"id": "r", "messages": [user("Say go."), bot(answer)]}]
    path = write(tmp_path, rows)
    assert load_conversations(DataConfig(dataset=path, max_answer_repetition=0.6)).samples
    assert load_conversations(DataConfig(dataset=path, max_answer_repetition=0.59)).dropped["looping_answer"] == 1


def test_structure_with_changing_values_is_kept(tmp_path):
    cases = "\n".join(f"Test Case {i}: FICO = {700 + 10 * i}, N_INQ = {i % 3}\n- Input: FICO = {700 + 10 * i}, "
                      f"N_INQ = {i % 3}\n- Expected Output: Condition is True" for i in range(1, 9))
    rows = [{"id": "cases", "messages": [user("Write test cases."), bot(cases)]}]
    c = load_conversations(DataConfig(dataset=write(tmp_path, rows)))
    assert repeated_ngram_rate(cases.split()) > 0.5  # the old word seq-rep-4 filter dropped it
    assert [s["id"] for s in c.samples] == ["cases"] and not c.dropped


def test_a_looping_side_of_a_tie_is_counted_inside_the_kept_row(tmp_path):
    row = {"question_id": "t1", "winner": "tie", "model_a": "x", "model_b": "y", "language": "English",
           "conversation_a": [user("Tell me about doctors."), bot(FINE)],
           "conversation_b": [user("Tell me about doctors."), bot(LOOP)]}
    c = load_conversations(DataConfig(dataset=write(tmp_path, [row])))
    assert [s["side"] for s in c.samples] == ["a"]
    assert c.samples_dropped == Counter({"looping_answer": 1}) and c.rows_kept == 1


def test_seed_preset_has_no_loop_filter_and_bad_thresholds_fail():
    assert DataConfig(preset="seed").max_answer_repetition == 0.0
    assert DataConfig().max_answer_repetition == 0.3
    with pytest.raises(UserError, match="between 0 and 1"):
        DataConfig(max_answer_repetition=1.5)
    with pytest.raises(UserError, match="max_answer_repetition"):
        DataConfig(preset="seed", max_answer_repetition=0.4)
