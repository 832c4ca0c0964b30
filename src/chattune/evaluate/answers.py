"""Every answer of an evaluation on disk (``answers.jsonl``), and the answer files that
benchmarks' own judge scripts read, so a user with an API key can run the official judges:

- ``mtbench``: FastChat ``llm_judge`` (``data/mt_bench/model_answer/MODEL.jsonl``);
- ``arena-hard``: arena-hard-auto (``data/arena-hard-v0.1/model_answer/MODEL.jsonl``; the
  v2 layout, ``uid``/``messages``, when the question file used ``uid``);
- ``alpaca-eval``: AlpacaEval's ``model_outputs`` JSON list (``instruction``/``output``/``generator``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

EXPORTS = ["mtbench", "arena-hard", "alpaca-eval"]
FIELDS = ["prompt_id", "turn", "model", "decoding", "prompt", "text", "stopped", "finish_reason", "tokens"]


def write_answers(out_dir: Path, answers: list[dict]) -> Path:
    path = out_dir / "answers.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in answers:
            f.write(json.dumps({k: r[k] for k in FIELDS}, ensure_ascii=False) + "\n")
    return path


def model_id(run_name: str, model: str, decoding: str, headline: str) -> str:
    """``RUN-tuned`` for the headline decoding, ``RUN-tuned-greedy`` for the other."""
    return f"{run_name}-{model}" + ("" if decoding == headline else f"-{decoding}")


def export_answers(out_dir: Path, answers: list[dict], kind: str, run_name: str, id_key: str,
                   headline: str) -> list[Path]:
    """One answer file per model and decoding in ``out_dir/KIND/``; returns their paths."""
    groups: dict[str, dict] = {}
    for r in answers:
        name = model_id(run_name, r["model"], r["decoding"], headline)
        groups.setdefault(name, {}).setdefault(json.dumps(r["prompt_id"]), []).append(r)
    written = []
    for name, by_prompt in groups.items():
        prompts = [sorted(rows, key=lambda r: r["turn"]) for rows in by_prompt.values()]
        if kind == "alpaca-eval":
            path = out_dir / "alpaca-eval" / f"{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [{"instruction": t[0]["prompt"], "output": t[0]["text"], "generator": name} for t in prompts]
            path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        else:
            folder = "mt_bench" if kind == "mtbench" else "arena-hard-v0.1" if id_key != "uid" else "arena-hard-v2.0"
            path = out_dir / kind / folder / "model_answer" / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            line = _mtbench if kind == "mtbench" else _arena_hard_v2 if id_key == "uid" else _arena_hard_v01
            with path.open("w", encoding="utf-8") as f:
                for turns in prompts:
                    f.write(json.dumps(line(turns, name), ensure_ascii=False) + "\n")
        written.append(path)
    return written


def _answer_id(name: str, prompt_id) -> str:
    return hashlib.sha1(f"{name}:{prompt_id}".encode()).hexdigest()[:22]


def _mtbench(turns: list[dict], name: str) -> dict:
    pid = turns[0]["prompt_id"]
    return {"question_id": pid, "answer_id": _answer_id(name, pid), "model_id": name,
            "choices": [{"index": 0, "turns": [t["text"] for t in turns]}], "tstamp": time.time()}


def _arena_hard_v01(turns: list[dict], name: str) -> dict:
    pid = turns[0]["prompt_id"]
    return {"question_id": pid, "answer_id": _answer_id(name, pid), "model_id": name,
            "choices": [{"index": 0, "turns": [{"content": t["text"], "token_len": t["tokens"]} for t in turns]}],
            "tstamp": time.time(), "conv_metadata": {"token_len": turns[-1]["tokens"]}}


def _arena_hard_v2(turns: list[dict], name: str) -> dict:
    pid = turns[0]["prompt_id"]
    messages = []
    for t in turns:
        messages += [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": {"answer": t["text"]}}]
    return {"uid": pid, "ans_id": _answer_id(name, pid), "model": name, "messages": messages,
            "tstamp": time.time(), "metadata": {"token_len": sum(t["tokens"] for t in turns)}}
