"""Where a one-row decode step goes: the engine's own phases and torch.profiler's operators.

    .venv/bin/python benchmarks/profile_decode.py             # SmolLM2-135M, about 3 min
    .venv/bin/python benchmarks/profile_decode.py --steps 10  # quicker, noisier
    .venv/bin/python benchmarks/profile_decode.py --rows 16 --variants plain  # 16 requests at once

One request at a time (``chattune chat``'s case; ``--rows`` for more), drafts off, for each variant (the plain
model; a LoRA run's tuned rows, r=16 on q/k/v/o as in the recipe, in the lane it shares
with the base; prompt tuning; prefix tuning), each decoding (greedy; the shipped
sampling, seeded) and each forward (the model's own, ``lean_steps=False``; the lean step,
``engine/lean.py``). Per configuration: ms a step without the profiler (the median of
three runs of ``--steps`` steps), then one profiled run cut into
- weight matmuls: the linear operators' own time (oneDNN, MKL, LoRA's small ones);
- attention: the sdpa operators;
- other operators: every other operator's own time inside the forward (norms, RoPE,
  views, cache writes);
- Python in the forward: the forward's time outside any operator (module calls, keyword
  plumbing, the interpreter);
- sampling: the engine's choice of the token (penalty, top-k/top-p, the draw);
- engine: the step's inputs and the accept/stop logic, operators included;
- python: what is left of the profiled step (the engine's own loop).
The profiler adds its own cost to every operator, so the parts are reported as shares of
the profiled step and applied to the unprofiled ms a step. First, the floor: the step's
weight matmuls alone, back to back (``matmul_floor``). The last line is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generation  # noqa: E402
import torch  # noqa: E402
from torch.profiler import profile, record_function  # noqa: E402

from chattune.engine import DEFAULTS, GREEDY, Engine, Request, Variant  # noqa: E402
from chattune.engine import core  # noqa: E402

MATMULS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def variants(name: str) -> dict:
    """variant label -> (variants for the engine, the variant the request uses)."""
    from chattune.generate.loaded import method_variants
    from chattune.methods import get_method

    out = {}
    model, tok = generation.load(name)
    out["plain"] = ({"tuned": Variant(model)}, "tuned")
    for method_name, sets in (("lora", {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
                              ("prompt", {}), ("prefix", {})):
        method = get_method(method_name)
        cfg = method.config_cls(**sets)
        tuned = method.apply(generation.load(name)[0], cfg, tok).eval()
        torch.manual_seed(0)
        with torch.no_grad():  # off the identity, as after training
            for p in tuned.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.01)
        virtual = getattr(tuned.peft_config["default"], "num_virtual_tokens", 0) or 0
        out[method_name] = (method_variants(method, tuned, virtual), "tuned")
    return out, tok


def timed_steps(engine: Engine, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return (time.perf_counter() - start) / steps * 1000


def instrument() -> None:
    """Wrap the engine's phases in profiler ranges (inside this process only)."""
    for owner, attr, label in ((Engine, "_forward", "forward"), (Engine, "_choose", "sampling"),
                               (Engine, "_accept", "engine"), (core, "step_inputs", "engine")):
        original = getattr(owner, attr)

        def wrapped(*args, _f=original, _label=label, **kwargs):
            with record_function(f"phase::{_label}"):
                return _f(*args, **kwargs)

        setattr(owner, attr, wrapped)


def breakdown(prof, steps: int, wall_ms: float) -> dict:
    events = prof.key_averages()
    total = {e.key: e.cpu_time_total / 1000 / steps for e in events}  # ms a step, children included
    own = {e.key: e.self_cpu_time_total / 1000 / steps for e in events}
    matmuls = sum(v for k, v in own.items() if k in MATMULS)
    attention = sum(v for k, v in own.items() if "scaled_dot_product" in k)
    forward = total.get("phase::forward", 0.0)
    sampling, engine = total.get("phase::sampling", 0.0), total.get("phase::engine", 0.0)
    # operators' own time inside the forward: all of them but those of sampling and the
    # engine's phases (whose time is counted as operators whole: a slight overestimate)
    ops = sum(v for k, v in own.items() if not k.startswith("phase::")) - sampling - engine
    parts = {"weight matmuls": matmuls, "attention": attention,
             "other operators": max(ops - matmuls - attention, 0.0),
             "python in the forward": max(forward - ops, 0.0), "sampling": sampling, "engine": engine}
    parts["python"] = max(wall_ms - sum(parts.values()), 0.0)
    return {k: round(v / wall_ms, 3) for k, v in parts.items()}


def matmul_floor(model, steps: int) -> dict:
    """ms of the step's weight matmuls alone, one row, back to back: the lean step's packed
    matrices (fused q/k/v and gate/up, o, down, the output projection), as oneDNN packed
    and as plain ``F.linear`` (MKL) on the same matrices. Nothing else in between, so the
    floor a step's weight reads put under any decode of these weights here."""
    from chattune.engine.lean import LeanDecoder

    lean = LeanDecoder.build(model)
    mats = []
    for g in lean.groups:
        w = torch.cat([b.weight.detach() for b in g.bases]).contiguous()
        mats.append((w, torch.ops.mkldnn._reorder_linear_weight(w, None)))
    x = {w.shape[1]: torch.randn(1, w.shape[1]) for w, _ in mats}
    out = {}
    with torch.no_grad():
        for label, run in (("packed", lambda w, p: torch.ops.mkldnn._linear_pointwise(x[w.shape[1]], p, None, "none", [None], "")),
                           ("f_linear", lambda w, p: torch.nn.functional.linear(x[w.shape[1]], w))):
            for w, p in mats:  # warm-up
                run(w, p)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(steps):
                    for w, p in mats:
                        run(w, p)
                times.append((time.perf_counter() - start) / steps * 1000)
            out[label] = round(statistics.median(times), 1)
    mb = sum(w.nbytes for w, _ in mats) / 1e6
    out.update(matrices=len(mats), mb=round(mb, 1), gb_per_s_packed=round(mb / out["packed"], 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default="plain,lora,prompt,prefix")
    ap.add_argument("--rows", type=int, default=1, help="requests decoded together (16: the batched case)")
    args = ap.parse_args()
    built, tok = variants(args.model)
    prompts = generation.prompts_for(tok, args.rows, template="auto")
    floor = matmul_floor(built["plain"][0]["tuned"].model, args.steps)
    print(json.dumps({"matmul_floor_ms": floor}), flush=True)
    instrument()
    rows = []
    for label in args.variants.split(","):
        vs, name = built[label]
        for decoding, sampling in (("greedy", GREEDY), ("sampled", DEFAULTS.with_(seed=0))):
            for lean in (False, True):
                engine = Engine(vs, tok, eos_id=-1, max_batch=args.rows, draft_tokens=0, lean_steps=lean)
                for i, prompt in enumerate(prompts):
                    engine.add(Request(prompt, max_new_tokens=4 * args.steps + 10, variant=name,
                                       sampling=sampling.with_(seed=i) if sampling.seed is not None else sampling))
                for _ in range(4):  # prefill, warm-up steps
                    engine.step()
                ms = statistics.median(timed_steps(engine, args.steps) for _ in range(3))
                with profile() as prof:
                    profiled = timed_steps(engine, args.steps // 2 or 1)
                row = {"variant": label, "decoding": decoding, "forward": "lean" if lean else "model",
                       "rows": args.rows, "ms_per_step": round(ms, 1), "tokens_per_s": round(args.rows * 1000 / ms, 1),
                       "profiled_ms_per_step": round(profiled, 1),
                       "shares": breakdown(prof, args.steps // 2 or 1, profiled)}
                row["ms"] = {k: round(v * ms, 1) for k, v in row["shares"].items()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "matmul_floor_ms": floor, "rows": rows}))


if __name__ == "__main__":
    main()
