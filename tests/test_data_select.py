"""Arena selection: the vote, sides, turns, flags, language, bounds, clean-up, dedup, split."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import pytest

from chattune.data import DataConfig, load_conversations
from chattune.data.select import split_of
from chattune.errors import UserError


def arena(fixtures, **kw):
    return load_conversations(DataConfig(dataset=str(fixtures / "arena_rows.jsonl"), **kw))


def ids(c) -> set[str]:
    return {s["id"] for s in c.samples}


def test_winner_follows_the_vote(fixtures):
    c = arena(fixtures)
    assert {"r01:a", "r02:b", "r03:a", "r03:b", "r18:b", "r22:b"} <= ids(c)
    assert c.dropped["tie_bothbad"] == 1
    # the side the vote did not choose is never used: r22's side a starts with the assistant
    assert "r22:a" not in ids(c)
    assert c.rows_read == c.rows_kept + sum(c.dropped.values())


def test_tie_gives_two_samples_sharing_a_prompt(fixtures):
    c = arena(fixtures)
    r03 = [s for s in c.samples if s["id"].startswith("r03:")]
    assert len(r03) == 2 and r03[0]["messages"][0] == r03[1]["messages"][0]
    assert r03[0]["split"] == r03[1]["split"]  # keyed by the prompt


def test_identical_sides_are_duplicates(fixtures):
    c = arena(fixtures)
    assert "r21:a" in ids(c) and "r21:b" not in ids(c)
    assert c.samples_dropped == Counter({"duplicate": 1})


@pytest.mark.parametrize("side, expected", [("a", "r02:a"), ("b", "r01:b"), ("both", "r04:b")])
def test_fixed_sides_ignore_the_vote(fixtures, side, expected):
    c = arena(fixtures, side=side)
    assert expected in ids(c)
    assert "tie_bothbad" not in c.dropped
    assert all(s["side"] in ("a", "b") and s["id"].endswith(s["side"]) for s in c.samples)


def test_missing_unused_side_is_fine(fixtures):
    assert "r09:a" in ids(arena(fixtures, side="a"))
    assert arena(fixtures, side="b").dropped["missing_side"] == 1


def test_flags_from_each_tag(fixtures):
    dropped = arena(fixtures).dropped
    assert dropped["flagged"] == 3  # openai_moderation, roberta-large, t5-large: one row each
    kept = ids(arena(fixtures, keep_flagged=True))
    assert {"r05:a", "r06:a", "r07:b"} <= kept


def test_language(fixtures):
    c = arena(fixtures, language="japanese")
    assert ids(c) == {"r18:b"} and c.dropped["language"] == 10
    assert c.source.endswith("arena_rows.jsonl") and c.format == "arena"
    assert c.rows_read == c.rows_kept + sum(c.dropped.values())


def test_turns(fixtures):
    full = {s["id"]: s for s in arena(fixtures).samples}
    # r13 ends on an unanswered user turn: trimmed, the two answered turns stay
    assert [m["content"] for m in full["r13:a"]["messages"]] == ["Give me a fruit.", "An apple.", "Another one?", "A pear."]
    first = {s["id"]: s for s in arena(fixtures, turns="first").samples}
    assert len(first["r13:a"]["messages"]) == 2


def test_clean_up_reasons(fixtures):
    d = arena(fixtures).dropped
    assert (d["non_alternating"], d["empty_turn"], d["unknown_role"], d["duplicate"]) == (1, 1, 1, 1)


def test_character_bounds(fixtures):
    c = arena(fixtures, min_response_chars=10)
    assert "r02:b" in ids(c) and c.dropped["response_too_short"] >= 1
    c = arena(fixtures, max_prompt_chars=20)
    assert "r01:a" not in ids(c) and c.dropped["prompt_too_long"] >= 1
    with pytest.raises(UserError, match="above"):
        DataConfig(min_prompt_chars=5, max_prompt_chars=2)


def test_dedup_off(fixtures):
    c = arena(fixtures, dedup=False)
    assert "r16:a" in ids(c) and "r21:b" in ids(c)


def test_split_is_stable_and_keyed_by_prompt():
    assert split_of("What is the capital of Italy?", 0.1, 0.1) == split_of("  What is the capital of Italy?\n", 0.1, 0.1)
    splits = Counter(split_of(f"prompt number {i}", 0.1, 0.1) for i in range(5000))
    assert abs(splits["train"] / 5000 - 0.8) < 0.03 and abs(splits["test"] / 5000 - 0.1) < 0.02
    assert {split_of(f"p{i}", 0.0, 0.0) for i in range(100)} == {"train"}


def test_split_never_puts_a_prompt_in_two_splits():
    c = load_conversations(DataConfig(side="both", keep_flagged=True))
    by_prompt: dict[str, set] = {}
    for s in c.samples:
        by_prompt.setdefault(s["messages"][0]["content"], set()).add(s["split"])
    assert all(len(v) == 1 for v in by_prompt.values())
    assert {s["split"] for s in c.samples} == {"train", "validation", "test"}


def test_seed_preset():
    cfg = DataConfig(preset="seed")
    assert (cfg.side, cfg.turns, cfg.keep_flagged, cfg.dedup) == ("a", "first", True, False)
    c = load_conversations(cfg)
    for s in c.samples:
        prompt, answer = (m["content"] for m in s["messages"])
        assert s["side"] == "a" and 10 < len(prompt) < 1000 and 10 < len(answer) < 1500
    assert "flagged" not in c.dropped and c.rows_read == c.rows_kept + sum(c.dropped.values())
    with pytest.raises(UserError, match="preset seed sets side=a"):
        DataConfig(preset="seed", side="b")


@pytest.mark.parametrize("kw, message", [
    ({"side": "winners"}, "did you mean 'winner'"), ({"format": "jsonl"}, "not one of"),
    ({"template": "chatml"}, "did you mean 'chat'"), ({"val_ratio": 0.6, "test_ratio": 0.5}, "training share"),
    ({"max_length": 0}, "max_length"), ({"preset": "notebook"}, "unknown preset"), ({"max_rows": 0}, "positive"),
])
def test_config_validation(kw, message):
    with pytest.raises(UserError, match=message):
        DataConfig(**kw)


def test_builtin_sample_covers_the_schema():
    text = resources.files("chattune").joinpath("resources", "sample_arena.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    assert 40 <= len(rows) <= 100
    assert {r["winner"] for r in rows} == {"model_a", "model_b", "tie", "tie (bothbad)"}
    assert any(r["openai_moderation"]["flagged"] for r in rows)
    for model in ("roberta-large", "t5-large"):
        assert any(r["toxic_chat_tag"][model]["flagged"] for r in rows)
    assert len({r["language"] for r in rows}) >= 5
    assert any(r["turn"] > 1 for r in rows)
    keys = ["question_id", "model_a", "model_b", "winner", "judge", "conversation_a", "conversation_b", "turn",
            "anony", "language", "tstamp", "openai_moderation", "toxic_chat_tag"]
    assert all(list(r) == keys for r in rows)
    c = load_conversations(DataConfig())
    assert c.rows_read == len(rows) == c.rows_kept + sum(c.dropped.values())


def jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_thumbs_down_answers_are_dropped_and_unpaired_ids_have_no_side(tmp_path):
    rows = [{"id": "up", "prompt": "Say hi, please.", "completion": "Hi there!", "label": True},
            {"id": "down", "prompt": "Say bye, please.", "completion": "No.", "label": False}]
    c = load_conversations(DataConfig(dataset=jsonl(tmp_path / "unpaired.jsonl", rows)))
    assert ids(c) == {"up"} and c.dropped == Counter({"undesirable_answer": 1})


def test_a_side_out_of_bounds_does_not_stop_the_other_side(tmp_path):
    prompt = {"role": "user", "content": "Is water wet?"}
    row = {"question_id": "t1", "winner": "tie", "language": "English",
           "conversation_a": [prompt, {"role": "assistant", "content": "No."}],
           "conversation_b": [prompt, {"role": "assistant", "content": "Yes, it is."}]}
    c = load_conversations(DataConfig(dataset=jsonl(tmp_path / "arena.jsonl", [row]), min_response_chars=5))
    assert ids(c) == {"t1:b"} and c.samples_dropped == Counter({"response_too_short": 1})


@pytest.mark.parametrize("winner, reason, message", [(None, "missing_field", "no 'winner' (needed by --side winner)"),
                                                     ("model_c", "unknown_winner", "winner 'model_c'")])
def test_a_missing_or_unknown_vote_is_bad_input(tmp_path, winner, reason, message):
    turns = [{"role": "user", "content": "Is water wet?"}, {"role": "assistant", "content": "Yes, it is."}]
    row = {"question_id": "v1", "conversation_a": turns, "conversation_b": turns, **({"winner": winner} if winner else {})}
    path = jsonl(tmp_path / "arena.jsonl", [row])
    assert load_conversations(DataConfig(dataset=path)).dropped == Counter({reason: 1})
    with pytest.raises(UserError, match=re.escape(f": {reason}: {message} (drop --strict")):
        load_conversations(DataConfig(dataset=path, strict=True))


def test_first_turn_only_keeps_the_first_exchange_whatever_follows(tmp_path):
    turns = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
             {"role": "assistant", "content": "Anyone?"}]  # later turns that do not alternate
    row = {"question_id": "f1", "winner": "model_a", "conversation_a": turns, "conversation_b": turns}
    path = jsonl(tmp_path / "arena.jsonl", [row])
    first = load_conversations(DataConfig(dataset=path, turns="first"))
    assert [m["content"] for m in first.samples[0]["messages"]] == ["Hi?", "Hello."]
    assert load_conversations(DataConfig(dataset=path)).dropped == Counter({"non_alternating": 1})


def test_a_drop_reads_as_its_reason():
    from chattune.data.select import Drop
    assert str(Drop("language")) == "language" and Drop("language").reason == "language"


@pytest.mark.parametrize("bounds, kept", [({"min_response_chars": 11}, True), ({"min_response_chars": 12}, False),
                                          ({"max_response_chars": 11}, True), ({"max_response_chars": 10}, False),
                                          ({"min_prompt_chars": 13}, True), ({"max_prompt_chars": 13}, True),
                                          ({"max_prompt_chars": 12}, False)])
def test_character_bounds_are_inclusive(tmp_path, bounds, kept):
    turns = [{"role": "user", "content": "Is water wet?"}, {"role": "assistant", "content": "Yes, it is."}]  # 13, 11
    row = {"question_id": "b1", "winner": "model_a", "conversation_a": turns, "conversation_b": turns}
    c = load_conversations(DataConfig(dataset=jsonl(tmp_path / "arena.jsonl", [row]), **bounds))
    assert (ids(c) == {"b1:a"}) is kept
