"""``chattune demo`` (what ``make demo`` runs): offline, on the built-in SmolLM2-135M and the
built-in arena sample. Fine-tunes LoRA for a few minutes, then shows base and tuned
answers to three questions and the eval summary."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from chattune.config import from_dict
from chattune.errors import UserError

MARKER = ".chattune-demo"  # marks a directory the demo made, so a rerun may replace it
QUESTIONS = ["What's the capital of Italy?", "Why is the sky blue?", "Give me three tips for writing clean Python code."]


def demo(args) -> int:
    from chattune.evaluate import evaluate_run
    from chattune.engine import GREEDY
    from chattune.generate.loaded import load_run
    from chattune.evaluate.report import eval_table
    from chattune.training.settings import RunConfig
    from chattune.training.loop import train

    start = time.perf_counter()
    _clear_previous(Path(args.output_dir))
    cfg = from_dict(RunConfig, {
        "model": {"name": "smollm2-135m"},
        "data": {"dataset": "sample", "max_length": 512},
        "method": {"name": "lora", "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        "train": {"output_dir": args.output_dir, "max_steps": args.max_steps, "lr": 1e-3, "batch_size": 4,
                  "log_every": 5, "save_every": args.max_steps},
        "eval": {"num_generate": 4, "max_new_tokens": 64},
    })
    print(f"== chattune demo: LoRA on smollm2-135m, built-in arena sample, {args.max_steps} steps ==", flush=True)
    summary = train(cfg)
    (Path(args.output_dir) / MARKER).touch()
    print(f"trained in {summary['train_seconds']:.0f} s ({summary['tokens_per_s']:.0f} tokens/s), "
          f"final train loss {summary['final_train_loss']:.3f}", flush=True)
    run = load_run(args.output_dir)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    requests = [run.request(c, max_new_tokens=96, sampling=GREEDY, variant=v) for v in ("base", "tuned") for c in convs]
    answers = run.engine().run(requests)  # base and tuned answers decoded in one batch
    base_answers, tuned_answers = answers[:len(convs)], answers[len(convs):]
    for q, b, t in zip(QUESTIONS, base_answers, tuned_answers):
        print(f"\n### {q}\n[base ] {_show(b)}\n[tuned] {_show(t)}")
    print()
    result = evaluate_run(run, "test")
    result.pop("answers")
    print(eval_table(result))
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; chat with it: chattune chat {args.output_dir}")
    print(f"serve it (OpenAI API + chat page on http://127.0.0.1:8000/):\nchattune serve {args.output_dir}")
    return 0


def _clear_previous(out: Path) -> None:
    """A rerun of the demo replaces the demo's own earlier run, and nothing else."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MARKER).exists():
        raise UserError(f"{out} exists and is not a previous demo run: pick another --output-dir")
    print(f"replacing the previous demo run in {out}", flush=True)
    shutil.rmtree(out)


def _show(answer) -> str:
    text = " ".join(answer.text.split())
    return text + ("  <EOS>" if answer.stopped else "  <cut at the token limit>")
