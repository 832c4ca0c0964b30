"""The ``chattune`` command: one subcommand per step of the pipeline.

User mistakes raise ``UserError`` anywhere below; ``main`` prints them as one line and
exits with 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from chattune.errors import UserError

COMMON_HELP = "common flags override the YAML config; any other key: --set section.key=value"


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (sections: model, data, method, train, eval)")
    p.add_argument("--model", help="hub id, local HF dir, .gguf file, or smollm2-135m (default)")
    p.add_argument("--dataset", help="'sample' (built-in), a hub dataset, or a .jsonl/.json/.parquet file")
    p.add_argument("--format", help="row format: auto|arena|messages|sharegpt|alpaca|prompt-answers")
    p.add_argument("--method", help="lora|adapter|prompt|prefix|ia3|dora|full")
    p.add_argument("--max-steps", type=int, help="optimiser steps (overrides --epochs)")
    p.add_argument("--max-tokens", type=int, help="token budget: train until this many conversation tokens were seen")
    p.add_argument("--epochs", type=float, help="passes over the training split (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    p.add_argument("--batch-size", type=int, help="micro-batch size per process (default 8)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step (default 1)")
    p.add_argument("--max-length", type=int, help="max tokens per conversation/packed row (default 1024)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="pack conversations into full rows (default: on where the method allows)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="autocast precision (default auto)")
    p.add_argument("--output-dir", help="run directory (default runs/run)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=COMMON_HELP)


def _flags(args) -> dict:
    from chattune.settings import FLAG_KEYS

    return {k: getattr(args, k, None) for k in FLAG_KEYS}


def cmd_train(args) -> int:
    from chattune.settings import RunConfig, build_config
    from chattune.train import config_of, train
    from pathlib import Path

    if args.resume:
        if args.config:
            raise UserError("--resume reads the run's own config.yaml; do not pass --config with it")
        from chattune.config import from_dict

        cfg = from_dict(RunConfig, config_of(Path(args.resume)), "config")
        cfg.train.output_dir = args.resume
    else:
        cfg = build_config(args.config, _flags(args), args.set)
    summary = train(cfg, resume=bool(args.resume))
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(summary) if args.json else _format_summary(summary, cfg.train.output_dir))
    return 0


def _format_summary(s: dict, run_dir: str) -> str:
    val = f"{s['best_val_loss']:.4f}" if s.get("best_val_loss") is not None else "n/a"
    return (f"done: {s['steps']} steps, final train loss {s['final_train_loss']:.4f}, best val loss {val}, "
            f"{s['tokens_per_s']:.0f} tokens/s, peak memory {s['peak_memory_mb']:.0f} MB -> {run_dir}")


def cmd_eval(args) -> int:
    from chattune.evaluate import evaluate_run
    from chattune.generate import load_run
    from chattune.report import eval_table

    run = load_run(args.run_dir)
    result = evaluate_run(run, args.split, max_samples=args.max_samples, num_generate=args.num_generate,
                          max_new_tokens=args.max_new_tokens, include_base=not args.no_base)
    with open(os.path.join(args.run_dir, f"eval_{args.split}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result) if args.json else eval_table(result))
    return 0


def cmd_chat(args) -> int:
    from chattune.chat import chat

    return chat(args)


def cmd_export(args) -> int:
    from chattune.export import export

    print(export(args.run_dir, args.out))
    return 0


def cmd_methods(args) -> int:
    from chattune.methods.listing import list_methods

    print(list_methods(args.model))
    return 0


def cmd_demo(args) -> int:
    from chattune.demo import demo

    return demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chattune", description="Fine-tune a causal LM into a chat assistant.")
    parser.add_argument("-v", "--verbose", action="store_true", help="library logs and warnings")
    sub = parser.add_subparsers(dest="command", required=True)
    try:
        from chattune.data import command as data_command

        data_command.add_parser(sub)
        sub.choices["data"].set_defaults(func=data_command.run)
    except ImportError:
        pass

    p = sub.add_parser("train", help="fine-tune a model", description=COMMON_HELP)
    _add_train_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run against its base model")
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", help="train|validation|test (default test)")
    p.add_argument("--max-samples", type=int, help="cap on evaluated samples")
    p.add_argument("--num-generate", type=int, help="held-out prompts to answer (default: eval.num_generate)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget per answer")
    p.add_argument("--no-base", action="store_true", help="skip the base-model numbers")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="talk to a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", help="one question, answered once (non-interactive)")
    p.add_argument("--base", action="store_true", help="answer with the method disabled (the base model)")
    from chattune.engine import DEFAULTS as d

    p.add_argument("--temperature", type=float, help=f"0 = greedy (default {d.temperature})")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling (default {d.top_p})")
    p.add_argument("--top-k", type=int, help=f"top-k sampling, 0 = off (default {d.top_k})")
    p.add_argument("--repetition-penalty", type=float, help=f"on generated tokens only (default {d.repetition_penalty})")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="(default 256)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export", help="write a standalone Hugging Face model directory")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("methods", help="list fine-tuning methods with trainable parameter counts")
    p.add_argument("--model", default="smollm2-135m", help="model to count parameters on")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("demo", help="offline demo: LoRA on the built-in model and sample, base vs tuned")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--max-steps", type=int, default=20)
    p.set_defaults(func=cmd_demo)

    try:
        from chattune import compare

        compare.add_parser(sub)
    except ImportError:
        pass
    from chattune.serve import command as serve_command

    serve_command.add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"chattune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chattune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
