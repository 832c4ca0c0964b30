"""Where a one-row decode step goes: the engine's own phases and torch.profiler's operators.

    .venv/bin/python benchmarks/profile_decode.py             # SmolLM2-135M, about 3 min
    .venv/bin/python benchmarks/profile_decode.py --steps 10  # quicker, noisier

One request at a time (``chattune chat``'s case), drafts off, for each variant (the plain
model; a LoRA run's tuned rows, r=16 on q/k/v/o as in the recipe, in the lane it shares
with the base; prompt tuning; prefix tuning), each decoding (greedy; the shipped
sampling, seeded) and each forward (the model's own, ``lean_steps=False``; the lean step,
``engine/lean.py``). Per configuration: ms a step without the profiler (the median of
three runs of ``--steps`` steps), then one profiled run cut into
- weight matmuls: the linear operators' own time (oneDNN, MKL, LoRA's small ones);
- attention: the sdpa operators;
- rest of the forward: every other operator inside the forward (norms, RoPE, views,
  cache writes);
- sampling: the engine's choice of the token (penalty, top-k/top-p, the draw);
- engine: the step's inputs and the accept/stop logic, operators included;
- Python: what is left of the profiled step (interpreter, module calls, dispatch).
The profiler adds its own cost to every operator, so the parts are reported as shares of
the profiled step and applied to the unprofiled ms a step. The last line is one JSON
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
    attention = sum(v for k, v in total.items() if "scaled_dot_product" in k and k.startswith("aten::scaled"))
    forward = total.get("phase::forward", 0.0)
    parts = {"weight matmuls": matmuls, "attention": attention,
             "rest of the forward": max(forward - matmuls - attention, 0.0),
             "sampling": total.get("phase::sampling", 0.0), "engine": total.get("phase::engine", 0.0)}
    parts["python"] = max(wall_ms - sum(parts.values()), 0.0)
    return {k: round(v / wall_ms, 3) for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default="plain,lora,prompt,prefix")
    args = ap.parse_args()
    built, tok = variants(args.model)
    prompt = generation.prompts_for(tok, 1, template="auto")[0]
    instrument()
    rows = []
    for label in args.variants.split(","):
        vs, name = built[label]
        for decoding, sampling in (("greedy", GREEDY), ("sampled", DEFAULTS.with_(seed=0))):
            for lean in (False, True):
                engine = Engine(vs, tok, eos_id=-1, max_batch=1, draft_tokens=0, lean_steps=lean)
                engine.add(Request(prompt, max_new_tokens=4 * args.steps + 10, sampling=sampling, variant=name))
                for _ in range(4):  # prefill, warm-up steps
                    engine.step()
                ms = statistics.median(timed_steps(engine, args.steps) for _ in range(3))
                with profile() as prof:
                    profiled = timed_steps(engine, args.steps // 2 or 1)
                row = {"variant": label, "decoding": decoding, "forward": "lean" if lean else "model",
                       "ms_per_step": round(ms, 1), "tokens_per_s": round(1000 / ms, 1),
                       "profiled_ms_per_step": round(profiled, 1),
                       "shares": breakdown(prof, args.steps // 2 or 1, profiled)}
                row["ms"] = {k: round(v * ms, 1) for k, v in row["shares"].items()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
