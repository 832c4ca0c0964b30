"""A settings sweep from Python: LoRA at several learning rates, each run evaluated, one table.

    python examples/sweep.py --lrs 3e-4 1e-3 3e-3 --steps 100

Each run is an ordinary run directory under OUT (``chattune chat OUT/lr-0.001`` works).
"""

from __future__ import annotations

import argparse

import chattune


def sweep(model: str, lrs: list[float], steps: int, out: str, prompts: int, max_new_tokens: int) -> list[dict]:
    rows = []
    for lr in lrs:
        run = chattune.train(model=model, dataset="sample", method="lora", max_steps=steps, lr=lr,
                             max_length=512, output_dir=f"{out}/lr-{lr:g}")
        result = chattune.evaluate(run, num_prompts=prompts, max_new_tokens=max_new_tokens, decodings="greedy")
        tuned = result.data["tuned"]
        rows.append({"lr": lr, "train_loss": run.summary["final_train_loss"], "reference_loss": tuned.get("loss"),
                     "ends_with_eos": tuned["greedy"]["eos_share"], "loops": tuned["greedy"]["loop_share"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--prompts", type=int, default=20, help="held-out prompts per evaluation")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default="runs/sweep")
    args = p.parse_args(argv)
    rows = sweep(args.model, args.lrs, args.steps, args.out, args.prompts, args.max_new_tokens)
    print(f"{'lr':>8} {'train loss':>11} {'ref. loss':>10} {'EOS':>6} {'loops':>6}")
    for r in rows:
        ref = "n/a" if r["reference_loss"] is None else f"{r['reference_loss']:.4f}"
        print(f"{r['lr']:>8g} {r['train_loss']:>11.4f} {ref:>10} {r['ends_with_eos']:>6.0%} {r['loops']:>6.0%}")


if __name__ == "__main__":
    main()
