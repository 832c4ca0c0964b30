"""Reading rows: every file type and row format, format detection, the hub, bad input."""

from __future__ import annotations

import json

import pytest

from chattune.data import DataConfig, load_conversations
from chattune.errors import UserError


def load(path, **kw):
    return load_conversations(DataConfig(dataset=str(path), **kw))


def accounted(c) -> bool:
    return c.rows_read == c.rows_kept + sum(c.dropped.values())


@pytest.mark.parametrize("name, fmt, read, kept, dropped", [
    ("arena_rows.jsonl", "arena", 22, 8, {"flagged": 3, "tie_bothbad": 1, "malformed_json": 1, "missing_side": 1,
                                           "missing_field": 1, "wrong_type": 1, "unknown_role": 1,
                                           "non_alternating": 1, "empty_turn": 1, "duplicate": 1,
                                           "unknown_winner": 1, "not_an_object": 1}),
    ("messages.jsonl", "messages", 11, 3, {"wrong_type": 2, "non_alternating": 1, "unknown_role": 1,
                                           "missing_field": 1, "malformed_json": 1, "empty_turn": 1, "no_answer": 1}),
    ("messages.json", "messages", 3, 2, {"not_an_object": 1}),
    ("sharegpt.jsonl", "sharegpt", 5, 2, {"unknown_role": 2, "missing_field": 1}),
    ("alpaca.json", "alpaca", 4, 2, {"missing_field": 1, "wrong_type": 1}),
])
def test_formats_detected_and_every_row_accounted(fixtures, name, fmt, read, kept, dropped):
    c = load(fixtures / name)
    assert c.format == fmt
    assert (c.rows_read, c.rows_kept, dict(c.dropped)) == (read, kept, dropped)
    assert accounted(c)
    for s in c.samples:
        assert [m["role"] for m in s["messages"]] == ["user", "assistant"] * (len(s["messages"]) // 2)


def test_format_can_be_named(fixtures):
    assert load(fixtures / "messages.jsonl", format="messages").rows_kept == 3
    # the wrong format: every row lacks the fields it needs, counted, never a crash
    c = load(fixtures / "messages.jsonl", format="sharegpt")
    assert c.rows_kept == 0 and accounted(c) and c.dropped["missing_field"] == 10


def test_sharegpt_and_alpaca_become_messages(fixtures):
    c = load(fixtures / "sharegpt.jsonl")
    assert c.samples[1]["messages"][2] == {"role": "user", "content": "In miles?"}
    c = load(fixtures / "alpaca.json")
    assert c.samples[1]["messages"][0]["content"] == "Translate to Spanish.\n\nGood night"
    assert c.samples[0]["messages"][0]["content"] == "Give three tips for staying healthy."


def test_prompt_answers_choose_the_answer_model(fixtures):
    c = load(fixtures / "prompt_answers.jsonl", answer_model="model-y")
    assert (c.rows_kept, c.samples[1]["messages"][1]["content"]) == (3, "Nine.")
    c = load(fixtures / "prompt_answers.jsonl", answer_model="model-x")
    assert (c.rows_kept, dict(c.dropped)) == (2, {"missing_answer": 1})
    with pytest.raises(UserError, match="--answer-model.*model-x, model-y"):
        load(fixtures / "prompt_answers.jsonl")


def test_parquet(fixtures, tmp_path):
    import datasets

    rows = [json.loads(line) for line in (fixtures / "arena_rows.jsonl").read_text().splitlines()[:3]]
    path = tmp_path / "arena.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    c = load(path)
    assert (c.format, c.rows_read, c.rows_kept, len(c.samples)) == ("arena", 3, 3, 4)
    assert c.samples[0]["messages"][1]["content"] == "Rome is the capital of Italy."


def test_strict_names_file_and_line(fixtures):
    with pytest.raises(UserError, match=r"arena_rows\.jsonl:8: malformed_json"):
        load(fixtures / "arena_rows.jsonl", strict=True)
    with pytest.raises(UserError, match=r"messages\.jsonl:3: non_alternating|messages\.jsonl:4: unknown_role"):
        load(fixtures / "messages.jsonl", strict=True)


def test_max_rows(fixtures):
    c = load(fixtures / "arena_rows.jsonl", max_rows=3)
    assert c.rows_read == 3 and accounted(c)


@pytest.mark.parametrize("dataset, message", [
    ("missing.jsonl", "no such file"),
    ("./nowhere", "no such file"),
    ("not a hub id", "no such file"),
])
def test_missing_sources_are_one_line(dataset, message):
    with pytest.raises(UserError, match=message):
        load(dataset)


def test_unsupported_and_unreadable_files(tmp_path):
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type"):
        load(tmp_path / "rows.csv")
    (tmp_path / "rows.json").write_text('{"messages": []}')
    with pytest.raises(UserError, match="JSON array"):
        load(tmp_path / "rows.json")
    (tmp_path / "broken.json").write_text('[{"messages": ')
    with pytest.raises(UserError, match="not valid JSON"):
        load(tmp_path / "broken.json")
    (tmp_path / "odd.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(UserError, match="--format"):
        load(tmp_path / "odd.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot read parquet"):
        load(tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="directory"):
        load(tmp_path)


def test_hub_failure_names_the_fix(monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(UserError) as e:
        load("lmsys/chatbot_arena_conversations")
    assert "huggingface-cli login" in str(e.value) and "HF_TOKEN" in str(e.value) and "\n" not in str(e.value)


def test_hub_rows_are_read_as_arena(monkeypatch, fixtures):
    import datasets

    rows = [json.loads(line) for line in (fixtures / "arena_rows.jsonl").read_text().splitlines()[:4]]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: rows)
    c = load("lmsys/chatbot_arena_conversations")
    assert (c.format, c.rows_read, c.rows_kept, dict(c.dropped)) == ("arena", 4, 3, {"tie_bothbad": 1})


ODD = [("winner", ["model_a"]), ("winner", 3), ("language", 7), ("conversation_a", {"role": "user"}),
       ("conversation_a", [["user", "hi"]]), ("conversation_a", [{"role": None, "content": "hi"}]),
       ("conversation_a", [{"role": "user", "content": ["hi"]}]), ("toxic_chat_tag", ["flagged"]),
       ("toxic_chat_tag", {"t5-large": {"flagged": "yes"}}), ("openai_moderation", "flagged"),
       ("conversation_a", "user: hi")]


@pytest.mark.parametrize("key, value", ODD)
def test_odd_values_are_counted_never_raised(fixtures, tmp_path, key, value):
    row = json.loads((fixtures / "arena_rows.jsonl").read_text().splitlines()[0])
    row[key] = value
    (tmp_path / "odd.jsonl").write_text(json.dumps(row) + "\n")
    c = load(tmp_path / "odd.jsonl")
    assert (c.rows_read, c.rows_kept) == (1, 0) and accounted(c)
    assert set(c.dropped) <= {"wrong_type", "unknown_winner", "missing_field", "unknown_role"}
    with pytest.raises(UserError, match=r"odd\.jsonl:1: "):
        load(tmp_path / "odd.jsonl", strict=True)
