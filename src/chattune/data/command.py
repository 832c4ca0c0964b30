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

from chattune.data.config import FORMATS, PRESETS, SIDES, TEMPLATES, TURNS, DataConfig
from chattune.data.overview import select
from chattune.errors import UserError

CHOICES = {"format": FORMATS, "side": SIDES, "turns": TURNS, "template": TEMPLATES, "preset": PRESETS}
DESCRIPTION = """Load, select and split conversations as a training run would, and report every
row that was not kept with its reason. With --model or --tokenizer, also tokenise and count
tokens per split (total and loss-bearing). With --objective dpo|ipo|simpo|orpo|kto, select
what that objective trains on and say what every vote became (pairs, tie pairs, desirable and
undesirable answers) and why the others were dropped."""
OBJECTIVES = ["sft", "dpo", "ipo", "simpo", "orpo", "kto"]
TIES = ["drop", "rao-kupper", "davidson"]


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
    p.add_argument("--objective", choices=OBJECTIVES, default="sft",
                   help="select as this training objective does (default: sft)")
    p.add_argument("--ties", choices=TIES, default="drop",
                   help="with --objective dpo: keep 'tie' votes as tie pairs (as train.ties does; default: drop)")
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
    if not (args.model or args.tokenizer) and args.show and cfg.template == "chat":
        raise UserError("--show with --template chat needs --model or --tokenizer")
    if args.ties != "drop" and args.objective != "dpo":
        raise UserError("--ties applies to --objective dpo")
    selection = select(cfg, args.model, args.tokenizer, objective=args.objective, ties=args.ties != "drop")
    color = not args.json and sys.stdout.isatty()  # the loss-bearing part in green on a terminal, else in ⟦ ⟧
    shown = selection.samples(args.show, args.seed, ("\x1b[32m", "\x1b[0m") if color else ("⟦", "⟧"))
    if args.json:
        summary = selection.summary
        if args.show:
            summary["shown"] = shown
        print(json.dumps(summary, ensure_ascii=False, indent=1))
        return 0
    print(selection)
    for item in shown:
        print(f"\n--- {item['id']} ({item['split']}) " + "-" * 40)
        print(item["text"])
    return 0
