"""Replay an evaluation's answers through the engine's draft policy: how many decode steps
and fed tokens its rows would take with speculative steps, without a model.

    .venv/bin/python benchmarks/draft_replay.py RUN/eval-NAME/answers.jsonl --tokenizer RUN/tokenizer

Every token an answer holds is the one the engine chose, and a drafted token is kept
exactly when it equals that choice (``Engine._decode``), so the answers themselves say
which drafts a row would keep. Each answer is replayed with ``engine/lookup.py``'s own
``Lookup`` (its n-gram index, ``wanted`` and ``draft``) over its prompt's tokens and its
answer's: a step feeds 1 + the drafted tokens and keeps the drafts up to the first
wrong one, plus one token. The prompt is the user turn as written in ``answers.jsonl``,
tokenized without the chat template the engine puts around it, and the answer is its
text tokenized again: close to the engine's history, not identical. Prints steps, fed
tokens and answer tokens per model and decoding, and as the last line one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json

from transformers import AutoTokenizer

from chattune.engine import lookup


def replay(prompt: list[int], answer: list[int], limit: int) -> tuple[int, int]:
    """(steps, fed tokens) of one answer under the draft policy."""
    index = lookup.Lookup(prompt)
    steps = fed = i = 0
    while i < len(answer):
        room = min(limit, len(answer) - i - 1)
        n = index.wanted(room) if room > 0 else 0
        draft = index.draft(n) if n else []
        kept = 0
        while kept < len(draft) and draft[kept] == answer[i + kept]:
            kept += 1
        if draft:
            index.checked(len(draft), kept)
        for token in answer[i:i + kept + 1]:
            index.add(token)
        i += kept + 1
        steps += 1
        fed += 1 + len(draft)
    return steps, fed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("answers", help="answers.jsonl of chattune eval")
    ap.add_argument("--tokenizer", required=True, help="the run's tokenizer directory (RUN/tokenizer)")
    ap.add_argument("--draft-tokens", type=int, default=lookup.DRAFT_TOKENS)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with open(args.answers) as f:
        for line in f:
            row = json.loads(line)
            prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
            answer = tok(row["text"], add_special_tokens=False)["input_ids"]
            steps, fed = replay(prompt, answer, args.draft_tokens)
            for key in (f"{row['model']}/{row['decoding']}", "all"):
                totals[key].update(steps=steps, fed=fed, tokens=len(answer), answers=1)
    out = {}
    for key, t in sorted(totals.items()):
        out[key] = dict(t, steps_per_token=round(t["steps"] / max(t["tokens"], 1), 3),
                        fed_per_token=round(t["fed"] / max(t["tokens"], 1), 3))
        print(f"{key:16s} {t['answers']:4d} answers  {t['tokens']:7d} tokens  {t['steps']:7d} steps "
              f"({out[key]['steps_per_token']:.2f} a token)  {t['fed']:7d} fed ({out[key]['fed_per_token']:.2f} a token)")
    print(json.dumps({"draft_tokens": args.draft_tokens, "totals": out}))


if __name__ == "__main__":
    main()
