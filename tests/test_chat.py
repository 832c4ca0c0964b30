"""Chat: streaming that never shows a stop marker, one-shot and interactive sessions."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from types import SimpleNamespace

import pytest

from chattune.cli import main
from chattune.engine import GREEDY
from chattune.engine.text import TextTracker
from chattune.generate.chat import chat
from tiny import make_tokenizer, tiny_dirs  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def run_dir(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "run"
    assert main(["train", "--model", str(tiny_dirs["gpt2"]), "--max-steps", "2", "--output-dir", str(out),
                 "--max-length", "128"]) == 0
    return out


def feed(tracker: TextTracker, pieces: list[str]) -> bool:
    tok = tracker.tokenizer
    for piece in pieces:
        for t in tok(piece, add_special_tokens=False)["input_ids"]:
            if tracker.add(t):
                return True
    tracker.finish()
    return False


def test_stream_holds_back_and_drops_the_stop_marker():
    sink = io.StringIO()
    tracker = TextTracker(make_tokenizer(), ["### Human:"], sink.write)
    assert feed(tracker, ["Rome is the capital.", "\n\n##", "# Hu", "man: next question"])
    assert sink.getvalue() == "Rome is the capital.\n\n" == tracker.text


def test_partial_marker_prefix_is_released_when_it_turns_out_harmless():
    sink = io.StringIO()
    tracker = TextTracker(make_tokenizer(), ["### Human:"], sink.write)
    assert not feed(tracker, ["Use ## for", " headings"])
    assert sink.getvalue() == "Use ## for headings"


def test_one_shot_prompt_and_base_answer(run_dir, capsys):
    assert main(["chat", str(run_dir), "--prompt", "Hello there", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    tuned = capsys.readouterr().out
    assert main(["chat", str(run_dir), "--prompt", "Hello there", "--max-new-tokens", "5", "--temperature", "0",
                 "--base"]) == 0
    base = capsys.readouterr().out
    assert tuned.strip() and base.strip()
    # greedy is deterministic: the same settings give the same answer
    assert main(["chat", str(run_dir), "--prompt", "Hello there", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tuned


def test_interactive_multi_turn_session(run_dir):
    proc = subprocess.run([sys.executable, "-m", "chattune.cli", "chat", str(run_dir), "--max-new-tokens", "4"],
                          input="Hi\nAnd then?\n/reset\nAgain\n/quit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 3


class RecordingBot:
    """Answers 'answer N' and records the conversation each answer was asked for."""

    base, run_dir, run = False, "RUN", SimpleNamespace(cfg=SimpleNamespace(method=SimpleNamespace(name="lora")))

    def __init__(self):
        self.asked: list[list[dict]] = []

    def stream(self, conversation, **opts):
        self.asked.append(copy.deepcopy(conversation))
        yield from (f"answer {len(self.asked)}", " ")


def test_later_turns_see_the_earlier_ones_and_reset_clears_them(monkeypatch, capsys):
    bot = RecordingBot()
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nAnd then?\n\n/reset\nAgain\n/quit\n"))
    assert chat(bot, None, max_new_tokens=4, sampling=GREEDY) == 0
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    assert bot.asked == [[user("Hi")],
                         [user("Hi"), {"role": "assistant", "content": "answer 1"}, user("And then?")],
                         [user("Again")]]
    assert capsys.readouterr().out.count("assistant> answer") == 3


def test_chat_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["chat", str(tmp_path), "--prompt", "hi"]) == 2
    assert "not a finished chattune run" in capsys.readouterr().err
