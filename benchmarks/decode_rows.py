"""Decode-step cost against the number of rows: why more rows per step pay on a CPU.

    .venv/bin/python benchmarks/decode_rows.py            # SmolLM2-135M, 1/4/16/32/64 rows (about 1 min)
    .venv/bin/python benchmarks/decode_rows.py --profile  # also torch.profiler over 20 steps at 16 rows
    .venv/bin/python benchmarks/decode_rows.py --ragged   # also: one long prompt among 31 short ones

For each row count B, B requests (first user turns of the shared arena conversations,
seed template, greedy) are prefilled into one engine, a few steps warm up, then 10 decode
steps are timed, once as the engine runs them and once with every linear layer on
``F.linear`` (``ms_per_step_unpacked``), and so is the output projection alone (B hidden
states by the vocabulary matrix), both as ``F.linear`` and as the engine runs it (oneDNN's packed linear,
``chattune/engine/packed.py``). Prints ms per step and tokens/s per row count, and as the
last line one JSON object with the same numbers and ``tokens_per_s_vs_1`` (each row count
over one row).

``--ragged`` then times a batch of 32 rows where one prompt is long (256 to 2,048 tokens)
and the others are the usual short ones, so the shared cache is mostly padding: decode
steps with the padding masked (one sdpa per layer over every position), with attention
row by row on each row's own positions, and as the engine plans them (runs of rows,
``chattune.models.attention.plan_runs``), for the ratios ``masked_vs_planned`` and
``row_by_row_vs_planned`` per long length.
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
from chattune import attention  # noqa: E402
from chattune.engine import packed  # noqa: E402


def _ms(f, n: int = 10) -> float:
    for _ in range(3):
        f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return round((time.perf_counter() - start) * 1000 / n, 1)


def _step_ms(model, tok, prompts: list[list[int]], rows: int, steps: int) -> tuple[float, Engine]:
    """Seconds per decode step with ``rows`` rows (``prompts`` repeated to that many), and
    the engine (still decoding)."""
    engine = Engine({"tuned": Variant(model)}, tok, tok.eos_token_id, max_batch=rows, draft_tokens=0)  # one token a step
    for p in (prompts * rows)[:rows]:
        engine.add(Request(p, max_new_tokens=steps + 100, sampling=GREEDY))
    for _ in range(4):  # prefill, then warm-up steps
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps, engine


def ragged(model, tok, prompts: list[list[int]], steps: int, rows: int = 32) -> dict:
    filler = [t for p in prompts for t in p]
    res = {}
    lengths = sorted(map(len, prompts[:rows]))
    print(f"short prompts: {lengths[0]} to {lengths[-1]} tokens, median {lengths[len(lengths) // 2]}", flush=True)
    costs = attention.CALL_COST, attention.ALONE_COST
    for long in (0, 256, 512, 1024, 2048):  # 0: the short prompts alone
        timing = {}
        for label, cost in (("masked", (10**12, 1.0)), ("row_by_row", (0, 1.0)), ("planned", costs)):
            attention.CALL_COST, attention.ALONE_COST = cost
            reqs = ([(filler * (long // len(filler) + 1))[:long]] if long else []) + (prompts * rows)[:rows - (long > 0)]
            timing[label] = round(_step_ms(model, tok, reqs, rows, steps)[0] * 1000, 1)
        attention.CALL_COST, attention.ALONE_COST = costs
        timing["masked_vs_planned"] = round(timing["masked"] / timing["planned"], 2)
        timing["row_by_row_vs_planned"] = round(timing["row_by_row"] / timing["planned"], 2)
        res[long] = timing
        print(f"one {long}-token prompt among {rows - 1} short: masked {timing['masked']} ms a step, "
              f"row by row {timing['row_by_row']} ms, planned runs {timing['planned']} ms", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="1,4,16,32,64")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="torch.profiler over 20 steps at 16 rows")
    ap.add_argument("--ragged", action="store_true", help="one long prompt among 31 short: masked, row by row and planned attention")
    args = ap.parse_args()
    model, tok = generation.load(args.model)
    rows = [int(r) for r in args.rows.split(",")]
    prompts = generation.prompts_for(tok, max(rows))
    out = {"model": args.model, "steps": args.steps, "ms_per_step": {}, "tokens_per_s": {}, "output_projection_ms": {},
           "packed_projection_ms": {}, "ms_per_step_unpacked": {}}
    head = model.get_output_embeddings().weight
    for b in rows:
        step, engine = _step_ms(model, tok, prompts, b, args.steps)
        active = engine.active
        unpacked = packed.MIN_ELEMENTS
        packed.MIN_ELEMENTS = 10**12  # the same steps with every linear on F.linear
        plain, _ = _step_ms(model, tok, prompts, b, args.steps)
        packed.MIN_ELEMENTS = unpacked
        out["ms_per_step"][b], out["tokens_per_s"][b] = round(step * 1000, 1), round(active / step, 1)
        out["ms_per_step_unpacked"][b] = round(plain * 1000, 1)
        x = torch.randn(b, 1, head.shape[1])
        with torch.no_grad():
            out["output_projection_ms"][b] = _ms(lambda: torch.nn.functional.linear(x, head))
            with packed.PackedLinears(model)():
                out["packed_projection_ms"][b] = _ms(lambda: model.get_output_embeddings()(x))
        print(f"{b:3d} rows: {step * 1000:6.1f} ms a step ({plain * 1000:.1f} unpacked), {active / step:6.1f} tokens/s; "
              f"output projection "
              f"{out['output_projection_ms'][b]} ms as F.linear, {out['packed_projection_ms'][b]} ms packed", flush=True)
        if args.profile and b == 16:
            from torch.profiler import profile

            with profile() as prof:
                for _ in range(20):
                    engine.step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    if args.ragged:
        out["ragged"] = ragged(model, tok, prompts, args.steps)
    one = out["tokens_per_s"].get(1)
    out["tokens_per_s_vs_1"] = {b: round(v / one, 2) for b, v in out["tokens_per_s"].items()} if one else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
