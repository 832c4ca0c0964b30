"""One sequence at a time: each lever of the decode step on its own, against the model's own
forward, in one run.

    .venv/bin/python benchmarks/decode_levers.py              # SmolLM2-135M, about 8 min
    .venv/bin/python benchmarks/decode_levers.py --prompts 2  # a quick look

The same prompts (first user turns of the shared arena conversations, the model's chat
template), one request at a time as ``chattune chat`` sends them, up to ``--max-new-tokens``
each, greedy and with the shipped sampling (seeded), through:
- ``model``: the engine with the model's own forward (``lean_steps=False``), drafts off;
- ``lean, unfused``: the lean step (``engine/lean.py``) with one matmul per projection;
- ``lean``: the lean step as shipped (fused q/k/v and gate/up);
- ``lean, packed for one row``: its oneDNN weights laid out for one row (``PACK_ROWS``);
- ``lean, float16 weights`` and ``lean, bfloat16 weights``: its weight copies rounded
  (``Engine(weights=...)``, ``--decode-weights``);
- ``lean, drafts``: the lean step with the engine's speculative steps (as shipped).
Each system answers every prompt, the systems taking turns prompt by prompt (a slow minute
of a shared host falls on all of them). Reported: tokens/s, the ratio to ``model``, and how
many answers equal ``model``'s (all greedy answers should, but those of reduced weights;
sampled answers are the same draws only where the logits are). ``--compile`` also times
``torch.compile`` of a layer's feed-forward half against eager, and its compile time.
The last line is one JSON object.
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

from chattune.engine import DEFAULTS, GREEDY, Engine, Request, Variant  # noqa: E402
from chattune.engine import lean as lean_module  # noqa: E402

SYSTEMS = {  # label -> Engine keyword arguments, lean.FUSE, lean.PACK_ROWS
    "model": ({"lean_steps": False, "draft_tokens": 0}, True, None),
    "lean, unfused": ({"draft_tokens": 0}, False, None),
    "lean": ({"draft_tokens": 0}, True, None),
    "lean, packed for one row": ({"draft_tokens": 0}, True, 1),
    "lean, float16 weights": ({"draft_tokens": 0, "weights": "float16"}, True, None),
    "lean, bfloat16 weights": ({"draft_tokens": 0, "weights": "bfloat16"}, True, None),
    "lean, drafts": ({}, True, None),
}


def compiled_tail(model, repeats: int = 10) -> dict:
    """A layer's second half (o projection, residual, RMSNorm, gate/up, SiLU, down) over all
    layers, one row: eager against ``torch.compile`` (default inductor, static shapes)."""
    import torch.nn.functional as F

    def tail(h, attn, wo, norm, eps: float, wgu, wd):
        h = h + F.linear(attn, wo)
        g, u = F.linear(F.rms_norm(h, norm.shape, norm, eps), wgu).chunk(2, dim=-1)
        return h + F.linear(F.silu(g) * u, wd)

    layers = [(lay.self_attn.o_proj.weight, lay.post_attention_layernorm.weight,
               torch.cat([lay.mlp.gate_proj.weight, lay.mlp.up_proj.weight]), lay.mlp.down_proj.weight)
              for lay in model.model.layers]
    h, a = torch.randn(1, model.config.hidden_size), torch.randn(1, model.config.hidden_size)
    eps = model.config.rms_norm_eps

    def run(f):
        with torch.no_grad():
            for wo, norm, wgu, wd in layers:
                f(h, a, wo, norm, eps, wgu, wd)

    start = time.perf_counter()
    fast = torch.compile(tail, dynamic=False)
    run(fast)
    out = {"compile_s": round(time.perf_counter() - start, 1)}
    totals = {"eager": 0.0, "compiled": 0.0}
    for _ in range(2):  # taking turns
        for label, f in (("eager", tail), ("compiled", fast)):
            run(f)
            start = time.perf_counter()
            for _ in range(repeats):
                run(f)
            totals[label] += (time.perf_counter() - start) / repeats / 2 * 1000
    out.update({f"{k}_ms": round(v, 1) for k, v in totals.items()})
    out["compiled_vs_eager"] = round(totals["eager"] / totals["compiled"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="also torch.compile of a layer's second half")
    args = ap.parse_args()
    model, tok = generation.load(args.model)
    prompts = generation.prompts_for(tok, args.prompts, template="auto")
    result = {"model": args.model, "threads": torch.get_num_threads(), "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens}
    for decoding in ("greedy", "sampled"):
        engines = {}
        for label, (kwargs, fuse, pack_rows) in SYSTEMS.items():
            lean_module.FUSE, lean_module.PACK_ROWS = fuse, pack_rows
            engine = Engine({"tuned": Variant(model)}, tok, tok.eos_token_id, max_batch=1, **kwargs)
            if pack_rows and engine.lean["tuned"] is not None:  # every projection packed here, o/down/output too
                for group in engine.lean["tuned"].groups:
                    group.packed = None
            engine.run([Request(prompts[0], max_new_tokens=4, sampling=GREEDY)])  # warm-up: weights packed
            lean_module.FUSE, lean_module.PACK_ROWS = True, None
            engines[label] = engine
        totals = {label: [0, 0.0, []] for label in SYSTEMS}
        for i, p in enumerate(prompts):
            sampling = GREEDY if decoding == "greedy" else DEFAULTS.with_(seed=i)
            order = list(SYSTEMS) if i % 2 == 0 else list(reversed(SYSTEMS))
            for label in order:
                engine = engines[label]
                start = time.perf_counter()
                answer = engine.run([Request(p, max_new_tokens=args.max_new_tokens, sampling=sampling)])[0]
                totals[label][0] += len(answer.token_ids)
                totals[label][1] += time.perf_counter() - start
                totals[label][2].append(answer.token_ids)
        rows = {}
        base = totals["model"][0] / totals["model"][1]
        for label, (tokens, seconds, answers) in totals.items():
            rate = tokens / seconds
            rows[label] = {"tokens_per_s": round(rate, 1), "vs_model": round(rate / base, 2),
                           "same_answers_as_model": sum(a == b for a, b in zip(answers, totals["model"][2]))}
        drafts = engines["lean, drafts"]
        rows["lean, drafts"]["kept_of_drafted"] = round(drafts.kept / max(drafts.drafted, 1), 2)
        result[decoding] = rows
        print(json.dumps({decoding: rows}), flush=True)
    if args.compile:
        result["compiled_tail"] = compiled_tail(model)
        print(json.dumps({"compiled_tail": result["compiled_tail"]}), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
