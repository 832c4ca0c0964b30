"""bfloat16 autocast against float32 for training: which one is chattune's default.

The same ``chattune train`` run (model, data, seed, steps, LoRA settings) twice, each in its
own process: ``--precision bf16`` and ``--precision fp32``. Reported per precision: the
median step time over the steps after the first, tokens/s, peak memory, the final training
loss, and the validation answer-token loss of the trained adapter. That loss is computed
here for both runs in float32 by one function, so it measures what training did, not how the
evaluation was computed.

    .venv/bin/python benchmarks/precision.py --model smollm2-135m --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arena_conversations.jsonl"


def train(precision: str, args, work: Path) -> dict:
    out = work / precision
    cmd = [sys.executable, "-m", "chattune.cli", "train", "--model", args.model, "--method", "lora",
           "--dataset", str(args.dataset), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--lr", str(args.lr), "--precision", precision,
           "--output-dir", str(out), "--set", "train.log_every=1", "--set", f"data.max_rows={args.rows}",
           "--set", f"train.save_every={args.steps}", "--set", "train.max_eval_samples=1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"precision: {precision} run failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [m["step_seconds"] for m in steps if "step_seconds" in m][1:]
    return {"precision": precision, "step_s": statistics.median(times), "tokens_per_s": summary["tokens_per_s"],
            "peak_mb": summary["peak_memory_mb"], "final_train_loss": summary["final_train_loss"], "run_dir": str(out)}


def val_loss_fp32(run_dir: str, samples: int) -> tuple[float, int]:
    """Answer-token loss of the run's adapter on its validation split, computed in float32."""
    import torch

    from chattune.data import prepare
    from chattune.training.passes import loss_on_samples
    from chattune.generate.loaded import load_run

    run = load_run(run_dir)
    val = prepare(run.cfg.data, run.tokenizer).splits["validation"][:samples]
    result = loss_on_samples(run.model, val, run.tokenizer.pad_token_id, 4, torch.device("cpu"), None)
    return result["loss"], len(val)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default=str(DATA))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--val-samples", type=int, default=32)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [train(precision, args, Path(tmp)) for precision in ("bf16", "fp32")]
        for r in rows:
            r["val_loss_fp32"], r["val_samples"] = val_loss_fp32(r.pop("run_dir"), args.val_samples)
    print(f"| precision | step time (s) | tokens/s | peak memory (MB) | final train loss | "
          f"val loss ({rows[0]['val_samples']} conversations, fp32) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['precision']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['final_train_loss']:.4f} | {r['val_loss_fp32']:.4f} |")
    bf16, fp32 = rows
    print(f"bf16 / fp32 speed: {bf16['tokens_per_s'] / fp32['tokens_per_s']:.2f}x; "
          f"val loss bf16 - fp32: {bf16['val_loss_fp32'] - fp32['val_loss_fp32']:+.4f}")
    print(json.dumps({"rows": rows, "speedup": bf16["tokens_per_s"] / fp32["tokens_per_s"],
                      "val_loss_delta": bf16["val_loss_fp32"] - fp32["val_loss_fp32"]}))


if __name__ == "__main__":
    main()
