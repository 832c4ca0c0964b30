"""The benchmarks' models and data: GPT-2 124M with random weights or the built-in SmolLM2,
and the arena conversations' first turns, selected and packed as ``throughput.py`` uses them."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import torch

import _systems

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (REPO.parent / "shared", Path("/work/shared")) if p.is_dir()), REPO.parent / "shared")
DATA = SHARED / "data" / "arena_conversations.jsonl"
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer"
SEED_CHARS = {"prompt": (10, 1000), "response": (10, 1500)}  # the notebook's filter: 10 < len < max


# -- models and data ------------------------------------------------------------------------------
def model_dir(name: str) -> Path:
    """A HF directory for ``name``: the built-in smollm2-135m, or GPT-2 124M with random weights."""
    from chattune.models.loading import cache_dir, resolve

    if name != "gpt2":
        return Path(resolve(name))
    target = cache_dir() / "bench" / "gpt2-124m-random"
    if not (target / "model.safetensors").is_file():
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        if not (GPT2_TOKENIZER / "vocab.json").is_file():
            sys.exit(f"throughput: {GPT2_TOKENIZER} is missing; pass --model-dir DIR instead")
        torch.manual_seed(0)
        # Random weights are right for speed and memory; the loss figures are then only a sanity check.
        GPT2LMHeadModel(GPT2Config()).save_pretrained(target, safe_serialization=True)
        AutoTokenizer.from_pretrained(GPT2_TOKENIZER).save_pretrained(target)
    return target


def count_params(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def first_pairs(path: Path) -> list[tuple[str, str]]:
    """First user->assistant pair of each conversation, kept by the seed's character bounds,
    one per prompt (so held-out prompts never occur in training)."""
    pairs, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        m = json.loads(line).get("messages") or []
        if len(m) < 2 or m[0].get("role") != "user" or m[1].get("role") != "assistant":
            continue
        p, a = m[0]["content"].strip(), m[1]["content"].strip()
        (pl, ph), (rl, rh) = SEED_CHARS["prompt"], SEED_CHARS["response"]
        if pl < len(p) < ph and rl < len(a) < rh and p not in seen:
            seen.add(p)
            pairs.append((p, a))
    return pairs


def select(pairs, tok, n_train: int, n_val: int, seed: int) -> dict:
    """Shuffled pairs that fit in 512 tokens: train, held-out validation, and the epoch's tokens."""
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    lengths = [len(_systems.answer_sample(tok, p, a)[0]) for p, a in pairs]
    fit = [(pair, n) for pair, n in zip(pairs, lengths) if n <= _systems.SEED_MAX_LENGTH]
    if len(fit) < n_train + n_val:
        sys.exit(f"throughput: only {len(fit)} conversations fit in 512 tokens; need {n_train} + {n_val}")
    return {"train": [p for p, _ in fit[:n_train]], "train_lengths": [n for _, n in fit[:n_train]],
            "val": [p for p, _ in fit[n_train:n_train + n_val]], "epoch_tokens": sum(n for _, n in fit),
            "epoch_conversations": len(fit)}


def pack_length(lengths: list[int], rows: int) -> int:
    """Smallest row capacity at which best-fit-decreasing packs ``lengths`` into ``rows`` rows."""
    from chattune.data import batch_plan

    def n_rows(capacity: int) -> int:
        return len(batch_plan(lengths, 1, packing=True, max_length=capacity, seed=0, epoch=0, shuffle=False))

    lo, hi = max(lengths), max(max(lengths), sum(lengths))
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if n_rows(mid) <= rows else (mid + 1, hi)
    return lo


def write_messages(path: Path, pairs) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i, (p, a) in enumerate(pairs):
            row = {"id": f"bench-{i}", "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
