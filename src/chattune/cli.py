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
from chattune.training.runguard import Interrupted

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
    p.add_argument("--objective", choices=["sft", "dpo", "ipo", "simpo", "orpo"],
                   help="training objective (default sft); the others train on preference pairs")
    p.add_argument("--init-from", metavar="RUN_DIR", help="start from a finished run's trained weights (SFT then DPO)")
    p.add_argument("--chosen-model", help="prompt-answers rows as pairs: the preferred model's answer")
    p.add_argument("--rejected-model", help="prompt-answers rows as pairs: the other model's answer")
    p.add_argument("--turns", choices=["all", "first"], help="all turns, or the first pair (default: all for sft, "
                   "first for preference pairs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=COMMON_HELP)


def _flags(args) -> dict:
    from chattune.training.settings import FLAG_KEYS

    return {k: getattr(args, k, None) for k in FLAG_KEYS}


def cmd_train(args) -> int:
    from pathlib import Path

    from chattune.training.settings import FLAG_KEYS, build_config
    from chattune.training.loop import config_of, train

    if args.resume:
        if args.config:
            raise UserError("--resume reads the run's own config.yaml; do not pass --config with it")
        if args.output_dir and Path(args.output_dir).resolve() != Path(args.resume).resolve():
            raise UserError("--resume continues RUN in its own directory; drop --output-dir")
        from chattune.training.resume import resume_config

        given = {FLAG_KEYS[k]: v for k, v in _flags(args).items() if v is not None and k != "output_dir"}
        cfg, changed = resume_config(Path(args.resume), given, args.set)
        if changed:
            print(f"resuming {args.resume} with {', '.join(changed)} changed", file=sys.stderr)
    else:
        if args.init_from and not (args.model or args.config):  # the earlier run's base model, unless told otherwise
            args.model = config_of(Path(args.init_from))["model"]["name"]
        cfg = build_config(args.config, _flags(args), args.set)
    try:
        summary = train(cfg, resume=bool(args.resume))
    except OSError as e:  # a full disk outside the checkpoint/metrics writes (config, summary, ...)
        from chattune.training.checkpoint import find_checkpoint
        from chattune.training.runguard import DISK_ERRORS, write_error

        if e.errno not in DISK_ERRORS:
            raise
        run_dir = Path(cfg.train.output_dir)
        raise write_error(e, Path(e.filename or run_dir), find_checkpoint(run_dir)) from None
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(summary) if args.json else _format_summary(summary, cfg.train.output_dir))
    return 0


def _format_summary(s: dict, run_dir: str) -> str:
    def num(key: str, fmt: str) -> str:
        return "n/a" if s.get(key) is None else format(s[key], fmt)

    return (f"done: {s.get('steps')} steps, final train loss {num('final_train_loss', '.4f')}, best val loss "
            f"{num('best_val_loss', '.4f')}, {num('tokens_per_s', '.0f')} tokens/s, peak memory "
            f"{num('peak_memory_mb', '.0f')} MB -> {run_dir}")


def cmd_eval(args) -> int:
    from pathlib import Path

    from chattune.evaluate import evaluate_run
    from chattune.evaluate.answers import export_answers, write_answers
    from chattune.generate.loaded import load_run
    from chattune.evaluate.report import eval_table

    run = load_run(args.run_dir)
    name = Path(args.prompts).stem if args.prompts else args.split
    out = Path(args.output_dir or Path(args.run_dir) / f"eval-{name}")
    out.mkdir(parents=True, exist_ok=True)
    judge = None
    if args.judge_url or args.judge_model:
        from chattune.evaluate.judge import Judge

        if not (args.judge_url and args.judge_model) or args.no_base:
            raise UserError("the judge needs --judge-url and --judge-model, and the base answers (no --no-base)")
        judge = Judge(args.judge_url, args.judge_model, args.judge_key_env, out / "judge_cache.jsonl")
    decodings = tuple(d.strip() for d in args.decodings.split(","))
    result = evaluate_run(run, args.split, prompts=args.prompts, fmt=args.format, turns=args.turns,
                          reference_model=args.reference_model, num_prompts=args.num_prompts,
                          max_samples=args.max_samples, max_new_tokens=args.max_new_tokens,
                          include_base=not args.no_base, decodings=decodings, seed=args.seed,
                          max_batch=args.max_batch, judge=judge)
    answers = result.pop("answers")
    write_answers(out, answers)
    if args.export_answers:
        run_name = Path(args.run_dir).resolve().name
        result["exports"] = [str(p) for p in export_answers(out, answers, args.export_answers, run_name,
                                                           result["prompts"]["id_key"], result["settings"]["headline"])]
    result["output_dir"] = str(out)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result) if args.json else eval_table(result) + f"\nanswers and result.json: {out}")
    return 0


def cmd_chat(args) -> int:
    from chattune.generate.chat import chat

    return chat(args)


def cmd_export(args) -> int:
    from chattune.generate.export import export

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
    p.add_argument("--prompts", metavar="FILE", help="prompt file: MT-Bench or Arena-Hard questions, or any row "
                   "format `chattune data` reads (default: the run's own held-out split)")
    p.add_argument("--format", default="auto", help="prompt file format: auto|mtbench|arena-hard|arena|messages|"
                   "sharegpt|alpaca|prompt-answers")
    p.add_argument("--turns", choices=["first", "all"], default="first",
                   help="all: also ask a question's second turn, after the model's own first answer")
    p.add_argument("--reference-model", help="whose answers are the references (Arena-Hard default: gpt-4-0314)")
    p.add_argument("--split", default="test", help="without --prompts: train|validation|test (default test)")
    p.add_argument("--num-prompts", "--num-generate", dest="num_prompts", type=int,
                   help="prompts to answer (default: eval.num_generate, 100; all when fewer)")
    p.add_argument("--max-samples", type=int, help="without --prompts: cap on the split's samples for the loss")
    p.add_argument("--max-new-tokens", type=int, help="generation budget per answer (default: eval.max_new_tokens, 512)")
    p.add_argument("--decodings", default="sampled,greedy",
                   help="sampled (the shipped sampling defaults, the headline) and/or greedy (a diagnostic)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt: derived from this and its id)")
    p.add_argument("--max-batch", type=int, default=32, help="answers decoded at once (continuous batching; default 32)")
    p.add_argument("--no-base", action="store_true", help="skip the base-model numbers")
    p.add_argument("--output-dir", help="where answers.jsonl and result.json go (default RUN/eval-NAME)")
    from chattune.evaluate.answers import EXPORTS

    p.add_argument("--export-answers", choices=EXPORTS, help="also write answer files for that benchmark's judge")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for a pairwise LLM judge, e.g. http://host:8000/v1")
    p.add_argument("--judge-model", help="the judge's model name")
    p.add_argument("--judge-key-env", help="environment variable holding the judge's API key")
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
        from chattune.compare import command as compare

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
    except Interrupted as stop:  # a first Ctrl-C/SIGTERM: training wrote its checkpoint
        print(stop, file=sys.stderr, flush=True)
        return stop.exit_code
    except KeyboardInterrupt as e:  # chattune.training.runguard.Abort (a second signal) carries its own code
        print("chattune: interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
