"""The ``chattune`` command: one subcommand per step of the pipeline.

Each ``cmd_*`` turns its parsed flags into a call of the Python API (``chattune.api``)
and prints what it returns; nothing is done here that the API does not do. User mistakes
raise ``UserError`` anywhere below; ``main`` prints them as one line and exits with 2.
Everything else is a bug and keeps its traceback.
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


def cmd_train(args) -> int:
    from chattune.api import train
    from chattune.training.flags import given_flags

    flags = {k: v for k, v in given_flags(args).items() if v is not None}
    run = train(args.config, resume=args.resume, overrides=args.set, **flags)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(run.summary) if args.json else _format_summary(run.summary, str(run.dir)))
    return 0


def _format_summary(s: dict, run_dir: str) -> str:
    def num(key: str, fmt: str) -> str:
        return "n/a" if s.get(key) is None else format(s[key], fmt)

    return (f"done: {s.get('steps')} steps, final train loss {num('final_train_loss', '.4f')}, best val loss "
            f"{num('best_val_loss', '.4f')}, {num('tokens_per_s', '.0f')} tokens/s, peak memory "
            f"{num('peak_memory_mb', '.0f')} MB -> {run_dir}")


def cmd_eval(args) -> int:
    from chattune.api import evaluate

    result = evaluate(args.run_dir, args.prompts, split=args.split, format=args.format, turns=args.turns,
                      reference_model=args.reference_model, num_prompts=args.num_prompts,
                      max_samples=args.max_samples, max_new_tokens=args.max_new_tokens, decodings=args.decodings,
                      seed=args.seed, max_batch=args.max_batch, base=not args.no_base, output_dir=args.output_dir,
                      export_answers=args.export_answers, judge_url=args.judge_url, judge_model=args.judge_model,
                      judge_key_env=args.judge_key_env)
    print(json.dumps(result.data) if args.json else f"{result.table()}\nanswers and result.json: {result.output_dir}")
    return 0


def cmd_chat(args) -> int:
    from chattune.api import Chatbot
    from chattune.generate.chat import chat, sampling_of
    from chattune.generate.loaded import load_run

    bot = Chatbot(load_run(args.run_dir), base=args.base,  # a run only: chattune.load also takes plain models
                  decode_weights=args.decode_weights)
    return chat(bot, args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling_of(args))


def cmd_export(args) -> int:
    from chattune.api import export

    print(export(args.run_dir, args.out, format=args.format, quant=args.quant, adapter_only=args.adapter_only))
    return 0


def cmd_methods(args) -> int:
    from chattune.methods.listing import list_methods

    print(list_methods(args.model))
    return 0


def cmd_demo(args) -> int:
    from chattune.demo import demo

    return demo(args)


def _add_train(sub) -> None:
    from chattune.training.flags import add_train_flags

    p = sub.add_parser("train", help="fine-tune a model", description=COMMON_HELP)
    p.add_argument("--config", help="YAML config (sections: model, data, method, train, eval)")
    add_train_flags(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=COMMON_HELP)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its checkpoint")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    from chattune.evaluate.answers import EXPORTS

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
    p.add_argument("--export-answers", choices=EXPORTS, help="also write answer files for that benchmark's judge")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for a pairwise LLM judge, e.g. http://host:8000/v1")
    p.add_argument("--judge-model", help="the judge's model name")
    p.add_argument("--judge-key-env", help="environment variable holding the judge's API key")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def _add_chat(sub) -> None:
    from chattune.engine import DEFAULTS as d

    p = sub.add_parser("chat", help="talk to a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", help="one question, answered once (non-interactive)")
    p.add_argument("--base", action="store_true", help="answer with the method disabled (the base model)")
    p.add_argument("--temperature", type=float, help=f"0 = greedy (default {d.temperature})")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling (default {d.top_p})")
    p.add_argument("--top-k", type=int, help=f"top-k sampling, 0 = off (default {d.top_k})")
    p.add_argument("--repetition-penalty", type=float, help=f"on generated tokens only (default {d.repetition_penalty})")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="(default 256)")
    _add_decode_weights(p)
    p.set_defaults(func=cmd_chat)


def _add_decode_weights(p) -> None:
    from chattune.engine.lean import WEIGHTS

    p.add_argument("--decode-weights", choices=list(WEIGHTS), default="float32",
                   help="precision of the decode step's weights on a CPU (Llama-family models): float16 reads half "
                        "the bytes a token, answers may differ from float32's (docs/chat-and-export.md; default float32)")


def _add_small(sub) -> None:
    """export, methods and demo."""
    p = sub.add_parser("export", help="write a standalone Hugging Face model directory, or GGUF for llama.cpp/Ollama")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="(default hf)")
    p.add_argument("--quant", choices=["f32", "f16", "bf16", "q8_0", "q4_0"], help="GGUF precision (default f16)")
    p.add_argument("--adapter-only", action="store_true", help="GGUF: LoRA as a llama.cpp adapter beside base.gguf")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("methods", help="list fine-tuning methods with trainable parameter counts")
    p.add_argument("--model", default="smollm2-135m", help="model to count parameters on")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("demo", help="offline demo: LoRA on the built-in model and sample, base vs tuned")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--max-steps", type=int, default=20)
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    from chattune.compare import command as compare_command
    from chattune.data import command as data_command
    from chattune.serve import command as serve_command

    parser = argparse.ArgumentParser(prog="chattune", description="Fine-tune a causal LM into a chat assistant.")
    parser.add_argument("-v", "--verbose", action="store_true", help="library logs and warnings")
    sub = parser.add_subparsers(dest="command", required=True)
    data_command.add_parser(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_chat(sub)
    _add_small(sub)
    compare_command.add_parser(sub)
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
