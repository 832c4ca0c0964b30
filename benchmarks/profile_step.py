"""Where a chattune LoRA step's CPU time goes: torch.profiler over a few training steps.

    .venv/bin/python benchmarks/profile_step.py --model smollm2-135m --steps 3

The data and settings of ``throughput.py`` (one packed row of 4 conversations a step,
LoRA r=8/alpha 16/dropout 0.05, bf16 autocast); one step runs first, unprofiled, so that
one-time set-up is not counted. Prints the operators by self CPU time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import throughput  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=throughput.MODELS, default="smollm2-135m")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--rows", type=int, default=20, help="operators to print")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra chattune override")
    args = p.parse_args()
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    from chattune.training.settings import build_config
    from chattune.training.loop import Trainer

    directory = throughput.model_dir(args.model)
    work = Path(tempfile.mkdtemp(prefix="chattune-profile-"))
    tok = AutoTokenizer.from_pretrained(directory)
    data = throughput.select(throughput.first_pairs(throughput.DATA), tok, 4 * (args.steps + 1), 1, 0)
    throughput.write_messages(work / "train.jsonl", data["train"])
    capacity = throughput.pack_length(data["train_lengths"], args.steps + 1)
    flags = {"model": str(directory), "dataset": str(work / "train.jsonl"), "format": "messages", "method": "lora",
             "max_steps": args.steps + 1, "batch_size": 1, "max_length": capacity, "lr": throughput.LR}
    sets = ["data.turns=first", "data.val_ratio=0", "data.test_ratio=0", "method.lora.r=8", "method.lora.alpha=16",
            "method.lora.dropout=0.05", *args.set]
    trainer = Trainer(build_config(None, flags, sets), work / "run")
    groups = trainer.plan.epoch(0)
    trainer.step(groups[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for group in groups[1:args.steps + 1]:
            trainer.step(group)
        seconds = time.perf_counter() - start
    tokens = sum(len(trainer.plan.samples[i]["input_ids"]) for g in groups[1:args.steps + 1] for mb in g for i in mb)
    print(f"{args.model}: {args.steps} profiled steps, {tokens} conversation tokens, {seconds:.2f} s "
          f"(with the profiler's overhead)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
