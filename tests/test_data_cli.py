"""`chattune data` through the real CLI entry point."""

from __future__ import annotations

import json

import pytest

cli = pytest.importorskip("chattune.cli")


def test_data_json(capsys):
    assert cli.main(["data", "--json", "--max-rows", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows_read"] == 20 == out["rows_kept"] + sum(out["dropped"].values())


def test_bad_input_is_one_line_exit_2(fixtures, capsys):
    assert cli.main(["data", "--dataset", str(fixtures / "arena_rows.jsonl"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "arena_rows.jsonl:8" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_hub_without_network_is_one_line(monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert cli.main(["data", "--dataset", "lmsys/chatbot_arena_conversations"]) == 2
    err = capsys.readouterr().err
    assert "huggingface-cli login" in err and len(err.strip().splitlines()) == 1
