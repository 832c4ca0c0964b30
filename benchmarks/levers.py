"""Which of chattune's speed levers pay on this machine: each one switched off (or on) alone.

Same model, conversations, steps and LoRA settings as ``throughput.py`` (it reuses its data
selection and packing capacity); only chattune runs, once per variant, each in its own
process. Variants:

  default         packing (flat rows, attention per conversation), bfloat16 autocast, logits
                  only at loss positions, no compile
  mask-packing    packed rows padded to the longest, with a block-diagonal T x T attention mask
  no-packing      4 length-grouped rows padded to the longest (what packing saves)
  fp32            float32 instead of bfloat16 autocast
  full-logits     LM-head logits at every position, as HF models compute them
  compile         torch.compile (inductor) on top of the default
  1-thread        OMP_NUM_THREADS=1 instead of one thread per core
  unlikelihood    train.unlikelihood_alpha=1 on top of the default (what the anti-loop term costs)

    .venv/bin/python benchmarks/levers.py --model gpt2 --steps 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import throughput  # noqa: E402

VARIANTS = {
    "default": ([], {}),
    "mask-packing": (["train.packed_layout=mask"], {}),
    "no-packing": (["train.packing=false", "train.batch_size=4", "data.max_length=512"], {}),
    "fp32": (["train.precision=fp32"], {}),
    "full-logits": (["train.loss_logits=full"], {}),
    "compile": (["train.compile=true"], {}),
    "1-thread": ([], {"OMP_NUM_THREADS": "1"}),
    "unlikelihood": (["train.unlikelihood_alpha=1"], {}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=throughput.MODELS, default="gpt2")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--data", type=Path, default=throughput.DATA)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    from transformers import AutoTokenizer

    throughput.CHILD_ENV.update(throughput.BENCH_ENV)
    directory = throughput.model_dir(args.model)
    work = Path(tempfile.mkdtemp(prefix="chattune-levers-"))
    tok = AutoTokenizer.from_pretrained(directory)
    data = throughput.select(throughput.first_pairs(args.data), tok, 4 * args.steps, 1, args.seed)
    throughput.write_messages(work / "train.jsonl", data["train"])
    spec = {"model_dir": str(directory), "train_file": str(work / "train.jsonl"), "steps": args.steps,
            "pack_length": throughput.pack_length(data["train_lengths"], args.steps), "seed": args.seed, "gpu": False,
            **throughput.LORA}
    rows = []
    for name in args.variants.split(","):
        sets, env = VARIANTS[name]
        saved = dict(throughput.CHILD_ENV)
        throughput.CHILD_ENV.update(env)
        throughput.log(f"{args.model}: chattune {name} ...")
        (work / name).mkdir()
        try:
            run_spec = {**spec, "adapters": {"chattune": str(work / name / "chattune-run" / "adapter")}}
            r = throughput.run_chattune(run_spec, work / name, sets)
        finally:
            throughput.CHILD_ENV.clear()
            throughput.CHILD_ENV.update(saved)
        rows.append({"variant": name, "tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"],
                     "first_step_s": r["first_step_s"], "peak_rss_mb": r["peak_rss_mb"],
                     "final_train_loss": r["final_train_loss"]})
    base = next((r["tokens_per_s"] for r in rows if r["variant"] == "default"), None)
    print(f"\n{args.model}, {args.steps} steps of 4 conversations ({sum(data['train_lengths']):,} tokens), "
          f"steady state over steps 2..{args.steps}")
    print("| variant | tokens/s | vs default | step (s) | first step (s) | peak RSS (MB) | final train loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {ratio} | {r['step_s']:.2f} | {r['first_step_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['final_train_loss']:.4f} |")
    print(json.dumps({"model": args.model, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
