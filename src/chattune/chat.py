"""``chattune chat``: interactive, multi-turn, streaming; ``--prompt`` for one shot."""

from __future__ import annotations

import contextlib

from chattune.generate import load_run, stream_answer


def chat(args) -> int:
    run = load_run(args.run_dir)
    device = next(run.model.parameters()).device
    opts = dict(device=device, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    ctx = run.base() if args.base else contextlib.nullcontext(run.model)
    with ctx as model:
        if args.prompt is not None:
            stream_answer(model, run.tokenizer, [{"role": "user", "content": args.prompt}], run.cfg.data.template, **opts)
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
            answer = stream_answer(model, run.tokenizer, history, run.cfg.data.template, **opts)
            history.append({"role": "assistant", "content": answer})
