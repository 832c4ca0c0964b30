"""Chat: streaming that never shows a stop marker, one-shot and interactive sessions."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from chattune.cli import main
from chattune.generate import StopAwareStreamer, cut_at_stop
from tiny import make_tokenizer, tiny_dirs  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def run_dir(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "run"
    assert main(["train", "--model", str(tiny_dirs["gpt2"]), "--max-steps", "2", "--output-dir", str(out),
                 "--max-length", "128"]) == 0
    return out


def test_streamer_holds_back_and_drops_the_stop_marker():
    tok = make_tokenizer()
    sink = io.StringIO()
    streamer = StopAwareStreamer(tok, ["### Human:"], sink)
    for piece in ["Rome is the capital.", "\n\n##", "# Hu", "man: next question"]:
        streamer.on_finalized_text(piece)
    streamer.on_finalized_text("", stream_end=True)
    assert sink.getvalue() == "Rome is the capital.\n\n"
    assert "#" not in streamer.text


def test_partial_marker_prefix_is_released_when_it_turns_out_harmless():
    sink = io.StringIO()
    streamer = StopAwareStreamer(make_tokenizer(), ["### Human:"], sink)
    streamer.on_finalized_text("Use ## for")
    streamer.on_finalized_text(" headings", stream_end=True)
    assert sink.getvalue() == "Use ## for headings"


def test_cut_at_stop():
    assert cut_at_stop("a ### Assistant: b ### Human: c", ["### Human:", "### Assistant:"]) == ("a ", True)
    assert cut_at_stop("plain", ["### Human:"]) == ("plain", False)


def test_one_shot_prompt_and_base_answer(run_dir, capsys):
    assert main(["chat", str(run_dir), "--prompt", "Hello there", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    tuned = capsys.readouterr().out
    assert main(["chat", str(run_dir), "--prompt", "Hello there", "--max-new-tokens", "5", "--temperature", "0",
                 "--base"]) == 0
    base = capsys.readouterr().out
    assert tuned.strip() and base.strip()


def test_interactive_multi_turn_session(run_dir):
    proc = subprocess.run([sys.executable, "-m", "chattune.cli", "chat", str(run_dir), "--max-new-tokens", "4"],
                          input="Hi\nAnd then?\n/reset\n/quit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2


def test_chat_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["chat", str(tmp_path), "--prompt", "hi"]) == 2
    assert "not a finished chattune run" in capsys.readouterr().err
