"""Decode-step cost against the number of rows: why more rows per step pay on a CPU.

    .venv/bin/python benchmarks/decode_rows.py            # SmolLM2-135M, 1/4/16/32/64 rows (about 1 min)
    .venv/bin/python benchmarks/decode_rows.py --profile  # also torch.profiler over 20 steps at 16 rows

For each row count B, B requests (first user turns of the shared arena conversations,
seed template, greedy) are prefilled into one engine, a few steps warm up, then 10 decode
steps are timed, and so is the output projection alone (B hidden states by the vocabulary
matrix), both as ``F.linear`` and as the engine runs it (oneDNN's packed linear,
``chattune/engine/head.py``). Prints ms per step and tokens/s per row count, and as the
last line one JSON object with the same numbers and ``tokens_per_s_vs_1`` (each row count
over one row).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generation  # noqa: E402
import torch  # noqa: E402

from chattune.engine import GREEDY, Engine, Request, Variant  # noqa: E402
from chattune.engine.head import packed_head  # noqa: E402


def _ms(f, n: int = 10) -> float:
    for _ in range(3):
        f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return round((time.perf_counter() - start) * 1000 / n, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="1,4,16,32,64")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="torch.profiler over 20 steps at 16 rows")
    args = ap.parse_args()
    model, tok = generation.load(args.model)
    rows = [int(r) for r in args.rows.split(",")]
    prompts = generation.prompts_for(tok, max(rows))
    out = {"model": args.model, "steps": args.steps, "ms_per_step": {}, "tokens_per_s": {}, "output_projection_ms": {},
           "packed_projection_ms": {}}
    head = model.get_output_embeddings().weight
    for b in rows:
        engine = Engine({"tuned": Variant(model)}, tok, tok.eos_token_id, max_batch=b)
        for p in (prompts * b)[:b]:
            engine.add(Request(p, max_new_tokens=args.steps + 100, sampling=GREEDY))
        for _ in range(4):  # prefill, then warm-up steps
            engine.step()
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        step = (time.perf_counter() - start) / args.steps
        out["ms_per_step"][b], out["tokens_per_s"][b] = round(step * 1000, 1), round(engine.active / step, 1)
        x = torch.randn(b, 1, head.shape[1])
        with torch.no_grad():
            out["output_projection_ms"][b] = _ms(lambda: torch.nn.functional.linear(x, head))
            with packed_head(model):
                out["packed_projection_ms"][b] = _ms(lambda: model.get_output_embeddings()(x))
        print(f"{b:3d} rows: {step * 1000:6.1f} ms a step, {engine.active / step:6.1f} tokens/s; output projection "
              f"{out['output_projection_ms'][b]} ms as F.linear, {out['packed_projection_ms'][b]} ms packed", flush=True)
        if args.profile and b == 16:
            from torch.profiler import profile

            with profile() as prof:
                for _ in range(20):
                    engine.step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    one = out["tokens_per_s"].get(1)
    out["tokens_per_s_vs_1"] = {b: round(v / one, 2) for b, v in out["tokens_per_s"].items()} if one else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
