"""``chattune chat``: interactive, multi-turn, streaming; ``--prompt`` for one shot."""

from __future__ import annotations

from chattune.engine import DEFAULTS
from chattune.generate.loaded import load_run, stream_answer


def sampling_of(args):
    """The shipped sampling defaults with the command line's changes."""
    return DEFAULTS.with_(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def chat(args) -> int:
    run = load_run(args.run_dir)
    variant = "base" if args.base else "tuned"
    opts = dict(variant=variant, max_new_tokens=args.max_new_tokens, sampling=sampling_of(args))
    if args.prompt is not None:
        stream_answer(run, [{"role": "user", "content": args.prompt}], **opts)
        return 0
    who = "base" if args.base else run.cfg.method.name
    print(f"chatting with {run.run_dir} ({who}); /reset clears the history, /quit or Ctrl-D leaves")
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
        answer = stream_answer(run, history, **opts)
        history.append({"role": "assistant", "content": answer.text.strip()})
