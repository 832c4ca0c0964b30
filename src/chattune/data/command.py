"""`chattune data`: run the data step alone and report what it kept, dropped and tokenised.

The selection options are generated from ``DataConfig``'s fields and help texts, so the
command line, the YAML ``data:`` section and the documentation cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from chattune.data.config import FORMATS, PRESETS, SIDES, TEMPLATES, TURNS, DataConfig
from chattune.data.render import prepare
from chattune.data.select import load_conversations
from chattune.data.summary import format_summary, marked_text, marked_tokens, pick, summary_dict
from chattune.errors import UserError

CHOICES = {"format": FORMATS, "side": SIDES, "turns": TURNS, "template": TEMPLATES, "preset": PRESETS}
DESCRIPTION = """Load, select and split conversations as a training run would, and report every
row that was not kept with its reason. With --model or --tokenizer, also tokenise and count
tokens per split (total and loss-bearing)."""


def add_parser(subparsers) -> None:
    """Register the ``data`` subcommand and its options on an argparse subparsers object."""
    p = subparsers.add_parser("data", help="select, split and count conversations (no training)",
                              description=DESCRIPTION)
    hints = typing.get_type_hints(DataConfig)
    for f in dataclasses.fields(DataConfig):
        _add_field(p, f, hints[f.name])
    who = p.add_mutually_exclusive_group()
    who.add_argument("--model", help="tokenise with this model's tokenizer (hub id, local dir or smollm2-135m)")
    who.add_argument("--tokenizer", help="tokenise with this tokenizer (local directory or hub id)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the readable summary")
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="print N rendered samples with the loss-bearing part marked (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="which samples --show picks (default: 0)")
    p.set_defaults(func=run)


def _add_field(p: argparse.ArgumentParser, f: dataclasses.Field, tp) -> None:
    flag = "--" + f.name.replace("_", "-")
    helptext = f.metadata["help"]
    if tp is bool:
        if f.default:  # a feature on by default is switched off with --no-<name>
            p.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                           help=f"turn off: {helptext} (default: on)")
        else:
            p.add_argument(flag, dest=f.name, action="store_true", help=f"{helptext} (default: off)")
        return
    kind = next((t for t in (int, float, str) if t is tp or t in typing.get_args(tp)), str)
    p.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=CHOICES.get(f.name),
                   metavar=None if f.name in CHOICES else f.name.split("_")[-1].upper(),
                   help=f"{helptext} (default: {f.default})")


def run(args: argparse.Namespace) -> int:
    """Run the data step for parsed ``args``; prints the summary, returns the exit code.

    Raises:
        UserError: any problem the user can fix (the CLI prints it as one line, exit 2).
    """
    cfg = DataConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)})
    name = args.model or args.tokenizer
    tokenizer = _load_tokenizer(args.model, args.tokenizer) if name else None
    if tokenizer is None and args.show and cfg.template == "chat":
        raise UserError("--show with --template chat needs --model or --tokenizer")
    prepared = prepare(cfg, tokenizer) if tokenizer is not None else None
    conversations = prepared.conversations if prepared else load_conversations(cfg)
    summary = summary_dict(cfg, conversations, prepared, name)
    shown = _shown(conversations, prepared, tokenizer, args.show, args.seed, color=not args.json and sys.stdout.isatty())
    if args.json:
        if args.show:
            summary["shown"] = shown
        print(json.dumps(summary, ensure_ascii=False, indent=1))
        return 0
    print(format_summary(summary))
    for item in shown:
        print(f"\n--- {item['id']} ({item['split']}) " + "-" * 40)
        print(item["text"])
    return 0


def _shown(conversations, prepared, tokenizer, n: int, seed: int, color: bool) -> list[dict]:
    """``n`` rendered samples; the loss-bearing part in green on a terminal, else in ⟦ ⟧."""
    if n <= 0:
        return []
    marks = ("\x1b[32m", "\x1b[0m") if color else ("⟦", "⟧")
    if prepared is None:
        samples = conversations.samples
        return [{"id": samples[i]["id"], "split": samples[i]["split"],
                 "text": marked_text(samples[i]["messages"], marks)} for i in pick(n, len(samples), seed)]
    samples = [s | {"split": name} for name, split in prepared.splits.items() for s in split]
    return [{"id": samples[i]["id"], "split": samples[i]["split"],
             "text": marked_tokens(samples[i]["input_ids"], samples[i]["labels"], tokenizer, marks)}
            for i in pick(n, len(samples), seed)]


def _load_tokenizer(model: str | None, path: str | None):
    if model:
        try:
            from chattune.models.loading import load_tokenizer
        except ImportError:  # models.py not written yet: a local directory still works
            load_tokenizer = None
        if load_tokenizer is not None:
            return load_tokenizer(model)
    return _tokenizer_from(model or path)


def _tokenizer_from(name: str):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    folder = Path(name).expanduser()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as e:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            # bare GPT-2 BPE files without a config AutoTokenizer understands
            # (transformers 5 ignores vocab_file=/merges_file= here and builds an empty BPE)
            return GPT2TokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
        raise UserError(f"cannot load a tokenizer from '{name}' ({type(e).__name__}); give a local tokenizer "
                        "directory, or a hub id while online") from None
