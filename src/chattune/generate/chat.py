"""``chattune chat``: interactive, multi-turn, streaming; ``--prompt`` for one shot.

The terminal around a ``chattune.api.Chatbot``: it reads turns, streams answers and keeps
the history; the answers come from the bot's engine.
"""

from __future__ import annotations

import sys

from chattune.engine import DEFAULTS, SamplingParams


def sampling_of(args) -> SamplingParams:
    """The shipped sampling defaults with the command line's changes."""
    return DEFAULTS.with_(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def _answer(bot, conversation: list[dict], opts: dict) -> str:
    pieces = []
    for piece in bot.stream(conversation, **opts):
        sys.stdout.write(piece)
        sys.stdout.flush()
        pieces.append(piece)
    sys.stdout.write("\n")
    return "".join(pieces)


def chat(bot, prompt: str | None, *, max_new_tokens: int, sampling: SamplingParams) -> int:
    """Answer ``prompt`` once, or talk with ``bot`` (a ``Chatbot``) until /quit or end of input."""
    opts = dict(max_new_tokens=max_new_tokens, sampling=sampling)
    if prompt is not None:
        _answer(bot, [{"role": "user", "content": prompt}], opts)
        return 0
    who = "base" if bot.base else bot.run.cfg.method.name
    print(f"chatting with {bot.run_dir} ({who}); /reset clears the history, /quit or Ctrl-D leaves")
    history: list[dict] = []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        answer = _answer(bot, history, opts)
        history.append({"role": "assistant", "content": answer.strip()})
