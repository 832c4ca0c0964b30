"""The loop detector (data/textstats.py) shared by the data filter and the eval's "loops":
degenerate loops flagged, structure (code, tables, test-case lists) kept, on hand-written
fixtures, on greedy answers of the built-in SmolLM2 (tests/fixtures/greedy_smollm2.jsonl)
and on real answers read from ../shared/data."""

from __future__ import annotations

import json

import pytest

from chattune.data.textstats import is_loop, loop_share, pieces, repeated_ngram_rate

CODE = "\n".join(f"const {name} = document.getElementById('{name}-input');" for name in
                 ("first", "last", "email", "phone", "street", "city", "zip", "country"))
TABLE = "| model | score |\n|---|---|\n" + "\n".join(f"| model-{i} | {50 + 3 * i} |" for i in range(10))
CASES = "\n".join(f"Test Case {i}: FICO = {700 + 25 * i}, N_INQ = {i % 3}\n- Input: FICO = {700 + 25 * i}, "
                  f"N_INQ = {i % 3}\n- Expected Output: Condition is {i % 2 == 0}" for i in range(1, 9))

# (arena conversation id, message index): degenerate loops in real Arena answers
ARENA_LOOPS = [("arena-28ccc717a235", 5), ("arena-765c23ba155b", 1), ("arena-4e4a6b563a3b", 3),
               ("arena-c347d3db0f19", 3), ("arena-32c14cefe126", 3), ("arena-3a67df38aa1d", 1),
               ("arena-8056b682d6b1", 3), ("arena-4c8bc6fa2435", 1), ("arena-743d323708bd", 3),
               ("arena-69e7d00678d0", 3), ("arena-1db4e73a9943", 3), ("arena-9933f219f7d2", 5),
               ("arena-fdaf154c71f9", 5), ("arena-828f19c109ae", 1)]
# structure in real Arena answers: a genealogy, a table with two equal cells, a dice list
ARENA_STRUCTURE = [("arena-d109d3d6246a", 1), ("arena-24aa451ee17f", 3), ("arena-5acbbf201f8e", 1)]
HARD_LOOPS = [("eebd25fb84794ba58787c00d13bad3a1", "gpt-3.5-turbo-0125"),
              ("e1e290b44b0142538498952d2b2e3204", "gpt-3.5-turbo-0125")]
TEST_CASES = "73e362946f0d45968fbdb933507f25fb"  # GPT-4's eight test cases in one layout


def test_hand_written_loops_and_structure():
    for loop in ("A doctor treats a patient. " * 12, "мама" * 40, "1. Silk\n2. Silk\n3. Silk\n4. Silk\n5. Silk\n" * 3,
                 "Sure! " + "I can play a game of tic-tac-toe with you. " * 6):
        assert is_loop(loop), loop[:40]
    for structure in (CODE, TABLE, CASES, "|---|---|---|\n" * 20, "/ " * 80, "doo doo doo, baby shark"):
        assert not is_loop(structure), structure[:40]
    assert repeated_ngram_rate(CASES.split()) > 0.5  # word seq-rep-4 calls the test cases a loop


def test_loop_share_counts_the_pieces_inside_repeated_runs():
    assert pieces("мамама да") == ["ма", "ма", "ма", "да"]
    assert pieces("1. go\n2. go") == ["-", "go", "-", "go"]
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa" + " go" * 15
    assert loop_share(text) == pytest.approx(15 / 25)
    assert loop_share("go go") == 0.0  # too short to hold a loop
    # a run cut by the budget: two whole copies and part of a third, at the end only
    para = "The cat sat on the mat and looked at the door for a while. "
    assert is_loop("Intro words here. " + para * 2 + "The cat sat on")
    assert not is_loop("Intro words here, then some more words that move forward. " + para * 2)


def test_greedy_smollm2_loops_are_flagged(fixtures):
    rows = [json.loads(line) for line in (fixtures / "greedy_smollm2.jsonl").read_text(encoding="utf-8").splitlines()]
    loops = [r for r in rows if r["kind"] == "loop"]
    assert len(loops) == 5 and all(is_loop(r["answer"]) for r in loops)
    # a wrong answer that moves forward, and a prompt echoed twice before EOS: not runaway loops
    assert not any(is_loop(r["answer"]) for r in rows if r["kind"] != "loop")


def _arena(shared_data) -> dict:
    return {r["id"]: r for r in map(json.loads, (shared_data / "arena_conversations.jsonl").open(encoding="utf-8"))}


def _hard(shared_data) -> dict:
    return {r["id"]: r for r in map(json.loads, (shared_data / "arena_hard_v0.1.jsonl").open(encoding="utf-8"))}


def test_precision_and_recall_on_real_answers(shared_data, fixtures):
    arena, hard = _arena(shared_data), _hard(shared_data)
    greedy = [json.loads(line)["answer"] for line in (fixtures / "greedy_smollm2.jsonl").open(encoding="utf-8")
              if json.loads(line)["kind"] == "loop"]
    loops = [arena[i]["messages"][k]["content"] for i, k in ARENA_LOOPS] + \
            [hard[i]["answers"][m] for i, m in HARD_LOOPS] + greedy
    # structure: every GPT-4 (0314) Arena-Hard answer that word seq-rep-4 calls repetitive, and three arena answers
    strong = [r["answers"]["gpt-4-0314"] for r in hard.values()]
    structure = [a for a in strong if repeated_ngram_rate(a.split()) > 0.2] + \
                [arena[i]["messages"][k]["content"] for i, k in ARENA_STRUCTURE]
    assert len(structure) == 17 + 3 and hard[TEST_CASES]["answers"]["gpt-4-0314"] in structure
    flagged_loops = sum(map(is_loop, loops))
    flagged_structure = sum(map(is_loop, structure))
    assert flagged_loops == len(loops) == 21  # recall 1
    assert flagged_loops / (flagged_loops + flagged_structure) == 1.0  # precision 1 on these fixtures


def test_the_reference_row_on_strong_answers_is_near_zero(shared_data):
    hard = _hard(shared_data)
    for model in ("gpt-4-0314", "gpt-4-0613"):
        answers = [r["answers"][model] for r in hard.values()]
        rate = sum(map(is_loop, answers)) / len(answers)
        old = sum(repeated_ngram_rate(a.split()) > 0.2 for a in answers) / len(answers)
        assert rate <= 0.005 and old > 0.01, (model, rate, old)  # word seq-rep-4 > 0.2: 3.4% and 1.6%
    assert not is_loop(hard[TEST_CASES]["answers"]["gpt-4-0314"])


def test_is_loop_equals_the_share_without_its_shortcut(shared_data):
    texts = [m["content"] for r in list(_arena(shared_data).values())[:400] for m in r["messages"]
             if m["role"] == "assistant" and isinstance(m["content"], str)]
    assert [is_loop(t) for t in texts] == [loop_share(t) > 0.3 for t in texts]
