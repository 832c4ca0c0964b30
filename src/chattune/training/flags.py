"""The command-line flags that set a run's common settings (``FLAG_KEYS``), declared once.

``chattune train`` adds all of them; ``chattune compare`` adds the ones its methods share,
with the same help text, so the two commands cannot describe a setting differently.
"""

from __future__ import annotations

import argparse

# flag name (as in FLAG_KEYS) -> add_argument keywords, in --help order
TRAIN_FLAGS: dict[str, dict] = {
    "model": dict(help="hub id, local HF dir, .gguf file, or smollm2-135m (default)"),
    "dataset": dict(help="'sample' (built-in), a hub dataset, or a .jsonl/.json/.parquet file"),
    "format": dict(help="row format: auto|arena|messages|sharegpt|alpaca|prompt-answers"),
    "method": dict(help="lora|adapter|prompt|prefix|ia3|dora|full"),
    "max_steps": dict(type=int, help="optimiser steps (overrides --epochs)"),
    "max_tokens": dict(type=int, help="token budget: train until this many conversation tokens were seen"),
    "epochs": dict(type=float, help="passes over the training split (default 1)"),
    "lr": dict(type=float, help="peak learning rate (default 2e-4)"),
    "batch_size": dict(type=int, help="micro-batch size per process (default 8)"),
    "grad_accum": dict(type=int, help="micro-batches per optimiser step (default 1)"),
    "max_length": dict(type=int, help="max tokens per conversation/packed row (default 1024)"),
    "packing": dict(action=argparse.BooleanOptionalAction, default=None,
                    help="pack conversations into full rows (default: on where the method allows)"),
    "precision": dict(choices=["auto", "bf16", "fp32"], help="autocast precision (default auto)"),
    "output_dir": dict(help="run directory (default runs/run)"),
    "seed": dict(type=int, help="random seed (default 0)"),
    "objective": dict(choices=["sft", "dpo", "ipo", "simpo", "orpo", "kto"],
                      help="training objective (default sft); dpo|ipo|simpo|orpo train on preference pairs, "
                           "kto on desirable and undesirable answers"),
    "init_from": dict(metavar="RUN_DIR", help="start from a finished run's trained weights (SFT then DPO)"),
    "chosen_model": dict(help="prompt-answers rows as pairs: the preferred model's answer"),
    "rejected_model": dict(help="prompt-answers rows as pairs: the other model's answer"),
    "turns": dict(choices=["all", "first"], help="all turns, or the first pair (default: all for sft, "
                  "first for preference pairs)"),
}


def add_train_flags(p: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """Add the flags ``names`` (default: all of ``TRAIN_FLAGS``, in its order) to ``p``."""
    for name in names or list(TRAIN_FLAGS):
        p.add_argument("--" + name.replace("_", "-"), **TRAIN_FLAGS[name])


def given_flags(args: argparse.Namespace) -> dict:
    """The flags a parsed command line gave (``None`` where not given), by ``FLAG_KEYS`` name."""
    return {name: getattr(args, name, None) for name in TRAIN_FLAGS}
