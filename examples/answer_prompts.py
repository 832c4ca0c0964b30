"""Answer a file of prompts with a run (or a plain model) and write one JSON line per answer.

    python examples/answer_prompts.py runs/quickstart prompts.txt answers.jsonl --greedy

PROMPTS is a text file with one prompt per line, or a .jsonl file whose rows have a
``prompt`` field. All prompts are decoded together (``Chatbot.generate``: continuous
batching on chattune's engine), the fastest way to answer many from Python.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import chattune


def read_prompts(path: Path) -> list[str]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line)["prompt"] for line in lines] if path.suffix == ".jsonl" else lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run directory, or a model (hub id, local directory, smollm2-135m)")
    p.add_argument("prompts", type=Path, help="one prompt per line, or .jsonl rows with a 'prompt' field")
    p.add_argument("out", type=Path, help="the JSONL file to write")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: the shipped sampling)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--base", action="store_true", help="answer with the run's method switched off")
    args = p.parse_args(argv)
    prompts = read_prompts(args.prompts)
    bot = chattune.load(args.run, base=args.base)
    answers = bot.generate(prompts, chattune.GREEDY if args.greedy else None, max_new_tokens=args.max_new_tokens)
    with args.out.open("w", encoding="utf-8") as f:
        for prompt, answer in zip(prompts, answers):
            f.write(json.dumps({"prompt": prompt, "answer": answer.text.strip(), "tokens": answer.tokens,
                                "finish_reason": answer.finish_reason}, ensure_ascii=False) + "\n")
    print(f"{len(answers)} answers -> {args.out}")


if __name__ == "__main__":
    main()
