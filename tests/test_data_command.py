"""`chattune data` through its own parser: summary, --json, --show, tokenizers, shared data."""

from __future__ import annotations

import argparse
import json

import pytest
from transformers import GPT2TokenizerFast

from chattune.data import DataConfig, command, prepare
from chattune.errors import UserError


def run(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser(prog="chattune")
    command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def run_json(argv: list[str], capsys) -> dict:
    return json.loads(run([*argv, "--json"], capsys))


def test_help_documents_defaults(capsys):
    with pytest.raises(SystemExit):
        run(["--help"], capsys)
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--side {winner,a,b,both}", "(default: winner)", "--no-dedup", "--keep-flagged",
                     "(default: 1024)", "--answer-model", "--preset {seed}", "--show N", "--tokenizer"):
        assert expected in text


def test_json_summary_on_the_sample(capsys):
    out = run_json([], capsys)
    assert out["rows_read"] == out["rows_kept"] + sum(out["dropped"].values())
    assert out["samples"] == sum(out["splits"].values()) and set(out["splits"]) == {"train", "validation", "test"}
    assert out["dropped"] == {"tie_bothbad": 8, "flagged": 5}
    assert out["samples"] > out["rows_kept"]  # ties give two samples
    assert "tokens" not in out


def test_json_with_tokenizer(tiny_tokenizer, tmp_path, fixtures, capsys):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    out = run_json(["--dataset", str(fixtures / "arena_rows.jsonl"), "--tokenizer", str(tmp_path / "tok")], capsys)
    assert (out["rows_read"], out["rows_kept"], out["samples"]) == (22, 8, 9)
    tokens = out["tokens"]
    assert sum(t["samples"] for t in tokens.values()) == 9
    assert all(0 < t["loss_tokens"] < t["tokens"] for t in tokens.values() if t["samples"])


def test_readable_summary_and_show(fixtures, capsys):
    text = run(["--dataset", str(fixtures / "messages.jsonl"), "--show", "2"], capsys)
    assert "11 read, 3 kept, 8 dropped" in text and "malformed_json 1" in text
    assert text.count("⟦") == text.count("⟧") >= 2 and "<EOS>⟧" in text


def test_show_with_tokenizer_marks_tokens(tiny_tokenizer, tmp_path, capsys):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    text = run(["--tokenizer", str(tmp_path / "tok"), "--show", "1", "--template", "chat"], capsys)
    assert "tokenizer" in text and "<|im_end|>\n⟧" in text and "<|im_start|>assistant\n⟦" in text
    out = run_json(["--tokenizer", str(tmp_path / "tok"), "--show", "2", "--template", "seed"], capsys)
    assert len(out["shown"]) == 2 and all("<|endoftext|>⟧" in s["text"] for s in out["shown"])


def test_user_errors(fixtures, capsys, tmp_path):
    with pytest.raises(UserError, match="arena_rows.jsonl:8"):
        run(["--dataset", str(fixtures / "arena_rows.jsonl"), "--strict"], capsys)
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        run(["--tokenizer", str(tmp_path / "nothing")], capsys)
    with pytest.raises(UserError, match="needs --model or --tokenizer"):
        run(["--template", "chat", "--show", "1"], capsys)


def test_bare_gpt2_files(tmp_path, capsys):
    vocab = {chr(c): i for i, c in enumerate(range(33, 127))} | {"<|endoftext|>": 94}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    out = run_json(["--tokenizer", str(tmp_path), "--max-rows", "5"], capsys)
    # the counts are those of the tokenizer in those files, as training would see them
    files = GPT2TokenizerFast(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    direct = prepare(DataConfig(max_rows=5), files).stats()
    assert direct["train"]["tokens"] > 0 and direct["train"]["loss_tokens"] > 0
    assert {k: out["tokens"]["train"][k] for k in ("samples", "tokens", "loss_tokens")} == \
        {k: direct["train"][k] for k in ("samples", "tokens", "loss_tokens")}


def test_shared_arena_conversations(shared_data, capsys):
    out = run_json(["--dataset", str(shared_data / "arena_conversations.jsonl")], capsys)
    assert out["rows_read"] == 2719 == out["rows_kept"] + sum(out["dropped"].values())
    assert out["format"] == "messages" and out["samples"] == out["rows_kept"]


def test_shared_arena_hard(shared_data, capsys):
    out = run_json(["--dataset", str(shared_data / "arena_hard_v0.1.jsonl"), "--format", "prompt-answers",
                    "--answer-model", "gpt-4-0314"], capsys)
    # all kept: the old word seq-rep-4 filter (0.63 > 0.5) dropped 73e36294's eight test cases in one layout
    assert out["rows_read"] == 500 and out["rows_kept"] == out["samples"] == 500 and out["dropped"] == {}
