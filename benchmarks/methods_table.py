"""The README's methods table: every registered method on one model, with its trainable
parameters, the measured time of one training step and the peak memory of a run.

Each method trains in its own process (peak RSS never goes down within a process), for
a few steps on real arena conversations; the step time is the median over the steps
after the first (which pays one-time warm-up costs).

    .venv/bin/python benchmarks/methods_table.py --model smollm2-135m --steps 4
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


def run_method(method: str, args, work: Path) -> dict:
    out = work / method
    cmd = [sys.executable, "-m", "chattune.cli", "train", "--model", args.model, "--method", method,
           "--dataset", str(args.dataset), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--output-dir", str(out),
           "--set", "train.log_every=1", "--set", f"data.max_rows={args.rows}", "--set", "train.save_every=1000",
           "--set", "train.max_eval_samples=1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"method": method, "error": (res.stderr.strip().splitlines() or ["failed"])[-1]}
    summary = json.loads((out / "summary.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [m["step_seconds"] for m in steps if "step_seconds" in m][1:]
    tokens = [m["tokens_per_s"] for m in steps if "tokens_per_s" in m][1:]
    return {"method": method, "trainable": info["trainable_params"], "share": info["trainable_share"],
            "packing": info["packing"], "step_s": statistics.median(times), "tokens_per_s": statistics.median(tokens),
            "peak_mb": summary["peak_memory_mb"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default=str(DATA))
    p.add_argument("--methods", default="lora,dora,ia3,adapter,prompt,prefix,full")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rows", type=int, default=200)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_method(m, args, Path(tmp)) for m in args.methods.split(",")]
    print("| method | trainable params | share | packing | step time (s) | tokens/s | peak memory (MB) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | error: {r['error']} | | | | | |")
            continue
        print(f"| {r['method']} | {r['trainable']:,} | {100 * r['share']:.3f}% | {'yes' if r['packing'] else 'no'} | "
              f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
