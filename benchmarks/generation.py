"""Decoding speed: chattune's engine against transformers' ``generate`` on the same prompts.

For each model (the built-in SmolLM2-135M, GPT-2 124M with random weights) and each number
of concurrent sequences C in {1, 4, 16, 64}, the same N requests (first user turns of the
shared arena conversations, greedy, EOS or ``--max-new-tokens``) are answered by:
- ``hf_single``: plain ``model.generate``, one request at a time (C = 1 only);
- ``hf_batched``: ``model.generate`` on batches of C left-padded prompts; a batch ends
  when its longest answer ends;
- ``hf_generate_batch``: transformers' own continuous batching (``generate_batch``),
  where it runs;
- ``chattune``: ``chattune.engine.Engine`` with C slots (continuous batching);
- ``llamacpp``: llama.cpp through llama-cpp-python's C API, on the first model's weights
  as ``chattune export --format gguf`` writes them (f32, f16, q8_0), at one sequence and
  at 16 (continuous batching in one llama.cpp context), greedy and sampled, against the
  engine with 1 and 16 slots (``llamacpp_system.py``; skipped when ``llama_cpp`` does not
  import: ``make llamacpp``).
Tokens/s counts answer tokens (EOS and padding excluded), all systems timed in one
process, taking turns: with ``--rounds R`` each system runs the workload R times,
alternating which goes first, and the rates are over the summed tokens and seconds (this
host's speed drifts by 20% and more within minutes: one round of ``--quick`` gave 1.26x to
1.8x in one afternoon; ``--quick --rounds 4``, about 6 min, is the README's figure). ``hf_single`` and C = 1 use the
first 8 requests (4 with ``--quick``: one sequence at a time is slow). Every method is also timed at C = 1 against plain
``generate`` (its own base model), bf16 weights against float32 at 16 sequences, with
the greedy answers compared, and eval's workload (a LoRA run's tuned and base answers
to the same prompts) with tuned and base rows in one forward per step (``Variant.route``)
against a forward per variant, and one sequence at a time with speculative steps (drafts
from the row's own history) against without.

Two prompt formats (``--templates``), because the answers' lengths decide what continuous
batching can win: ``auto``, the model's own chat template (how an instruct model is asked;
SmolLM2's answers then end at their natural lengths, and a static batch waits for its
longest), and ``seed``, the seed's ``### Human:`` format, which SmolLM2-Instruct rarely
ends, so nearly every answer runs to the limit and both systems do the same steps. Each
row reports the answers' median and maximum length and the share at the limit.

    .venv/bin/python benchmarks/generation.py --quick     # < 3 min: SmolLM2, chat template, C = 16, 128 tokens
    .venv/bin/python benchmarks/generation.py --quick --rounds 4   # the same, each system 4 times, alternating
    .venv/bin/python benchmarks/generation.py             # both models, both templates, C = 1, 4, 16, 64, 256 tokens
    .venv/bin/python benchmarks/generation.py --drafts    # ~2 min: one sequence, speculative steps off and on
    .venv/bin/python benchmarks/generation.py --phases    # ~1 min: the --quick workload's engine run, phases timed
    .venv/bin/python benchmarks/generation.py --llamacpp  # ~10 min: only the llama.cpp rows (SmolLM2, chat template)

The last line is one JSON object with ``vs_hf_batched_16``, ``vs_hf_single``,
``vs_llamacpp_single`` and ``vs_llamacpp_16`` (the engine over llama.cpp at f32, the
engine's precision, greedy; ``_sampled`` for the shipped sampling).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _data  # noqa: E402
import llamacpp_system  # noqa: E402

from chattune.engine import GREEDY, Engine, Request, Variant  # noqa: E402


def prompts_for(tok, n: int, max_prompt: int = 256, template: str = "seed") -> list[list[int]]:
    from chattune.data import render_prompt_ids

    out = []
    for p, _ in _data.first_pairs(_data.DATA):
        ids = render_prompt_ids([{"role": "user", "content": p}], tok, template)
        if len(ids) <= max_prompt:
            out.append(ids)
        if len(out) == n:
            return out
    return out


DEVICE = torch.device("cpu")  # --device; the engine follows the model's device


def load(name: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _data.model_dir(name)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa").eval().to(DEVICE)
    return model, tok


def answer_len(row: list[int], eos: int) -> int:
    return row.index(eos) if eos in row else len(row)


@torch.no_grad()
def hf_batched(model, tok, prompts, c: int, max_new: int) -> tuple[int, float, list[list[int]]]:
    eos, tokens, outs = tok.eos_token_id, 0, []
    start = time.perf_counter()
    for i in range(0, len(prompts), c):
        chunk = prompts[i:i + c]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[eos] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=eos, eos_token_id=eos)
        for row in out[:, width:].tolist():
            n = answer_len(row, eos)
            tokens += n
            outs.append(row[:n])
    return tokens, time.perf_counter() - start, outs


@torch.no_grad()
def hf_generate_batch(model, tok, prompts, c: int, max_new: int) -> tuple[int, float]:
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id, max_batch_tokens=c * 64, num_blocks=4096, block_size=32)
    start = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    tokens = sum(answer_len(list(r.generated_tokens), tok.eos_token_id) for r in out.values())
    return tokens, time.perf_counter() - start


def engine_run(variants, tok, prompts, c: int, max_new: int) -> tuple[int, float, list[list[int]]]:
    engine = Engine(variants, tok, tok.eos_token_id, max_batch=c)
    start = time.perf_counter()
    answers = engine.run([Request(p, max_new_tokens=max_new, sampling=GREEDY) for p in prompts])
    seconds = time.perf_counter() - start
    return sum(len(a.token_ids) for a in answers), seconds, [a.token_ids for a in answers]


def rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 1)


def model_table(name: str, concurrencies: list[int], n_req: int, max_new: int, try_batch_api: bool,
                single: int, template: str = "seed", rounds: int = 1) -> dict:
    model, tok = load(name)
    prompts = prompts_for(tok, max(n_req, max(concurrencies)), template=template)
    out = {"model": name, "template": template, "requests": len(prompts), "max_new_tokens": max_new, "rounds": rounds,
           "rows": []}
    engine_run({"tuned": Variant(model)}, tok, prompts[:2], 2, 4)  # warm-up
    t, s, _ = hf_batched(model, tok, prompts[:single], 1, max_new)
    out["hf_single"] = rate(t, s)
    print(f"[{name}] hf generate, 1 sequence: {out['hf_single']} tokens/s", flush=True)
    for c in concurrencies:
        reqs = prompts[:single] if c == 1 else prompts[: max(n_req, c)]
        row = {"concurrent": c}
        # The two systems take turns (hf, ours, ours, hf, ...) and their tokens and seconds are
        # summed: a shared host's slow minutes then fall on both.
        totals, per_round = {"hf": [0, 0.0], "ours": [0, 0.0]}, []
        for r in range(rounds):
            got = {}
            for system in (("hf", "ours") if r % 2 == 0 else ("ours", "hf")):
                if system == "hf":
                    t, s, hf_out = hf_batched(model, tok, reqs, c, max_new)
                else:
                    t, s, ours = engine_run({"tuned": Variant(model)}, tok, reqs, c, max_new)
                got[system] = rate(t, s)
                totals[system][0] += t
                totals[system][1] += s
            per_round.append(round(got["ours"] / got["hf"], 2))
        row["hf_batched"], row["chattune"] = rate(*totals["hf"]), rate(*totals["ours"])
        if rounds > 1:
            row["vs_hf_batched_by_round"] = per_round
        row["same_greedy_answers"] = sum(a == b for a, b in zip(ours, hf_out)) / len(reqs)
        if try_batch_api:
            try:
                t, s = hf_generate_batch(model, tok, reqs, c, max_new)
                row["hf_generate_batch"] = rate(t, s)
            except Exception as e:  # report, do not hide: it is a comparison point that may not run
                row["hf_generate_batch"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        row["answer_lengths"] = _spread([len(a) for a in ours], max_new)
        row["vs_hf_batched"] = round(row["chattune"] / row["hf_batched"], 2)
        row["vs_hf_single"] = round(row["chattune"] / out["hf_single"], 2)
        print(f"[{name}] {json.dumps(row)}", flush=True)
        out["rows"].append(row)
    return out


def _spread(lengths: list[int], limit: int) -> dict:
    """How much a static batch waits for its longest answer: the lengths' median, max and
    the share that ran to the token limit."""
    lengths = sorted(lengths)
    return {"median": lengths[len(lengths) // 2], "max": lengths[-1],
            "at_limit": round(sum(n >= limit for n in lengths) / len(lengths), 2)}


def bf16_check(name: str, n_req: int, max_new: int, c: int = 16) -> dict:
    """bf16 weights against float32 in the engine: speed and identical greedy answers.
    Skipped on a CPU without bf16 instructions, where bf16 matmuls are emulated (~100x slower)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print(f"[{name}] bf16 weights: skipped, this CPU has no bf16 instructions", flush=True)
        return {"skipped": "no bf16 instructions on this CPU (emulated, ~100x slower than float32)"}
    model, tok = load(name)
    prompts = prompts_for(tok, n_req)
    t32, s32, a32 = engine_run({"tuned": Variant(model)}, tok, prompts, c, max_new)
    model16 = model.to(torch.bfloat16)
    engine_run({"tuned": Variant(model16)}, tok, prompts[:2], 2, 4)
    t16, s16, a16 = engine_run({"tuned": Variant(model16)}, tok, prompts, c, max_new)
    res = {"fp32": rate(t32, s32), "bf16": rate(t16, s16), "bf16_vs_fp32": round(rate(t16, s16) / rate(t32, s32), 2),
           "same_greedy_answers": sum(a == b for a, b in zip(a32, a16)) / len(prompts)}
    print(f"[{name}] bf16 weights: {json.dumps(res)}", flush=True)
    return res


def lanes_check(name: str, n_req: int, max_new: int, c: int = 16) -> dict:
    """eval's workload: a LoRA run's tuned and base answers to the same prompts, tuned and
    base rows in one forward per step (the method's route) against one forward per variant."""
    from chattune.generate.loaded import method_variants
    from chattune.methods import get_method

    m = get_method("lora")
    base, tok = load(name)
    model = m.apply(base, m.config_cls(), tok).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B off zero, so tuned and base differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    prompts = prompts_for(tok, n_req // 2)
    reqs = lambda: [Request(p, max_new_tokens=max_new, sampling=GREEDY, variant=v)  # noqa: E731
                    for p in prompts for v in ("tuned", "base")]
    shared = method_variants(m, model)  # as eval builds them
    apart = {"tuned": Variant(model), "base": Variant(model, lambda: m.disable(model))}
    res = {}
    for label, variants in (("one_forward", shared), ("forward_per_variant", apart)):
        Engine(variants, tok, tok.eos_token_id, max_batch=c).run(reqs()[:4])  # warm-up
        engine = Engine(variants, tok, tok.eos_token_id, max_batch=c)
        start = time.perf_counter()
        answers = engine.run(reqs())
        res[label] = rate(sum(len(a.token_ids) for a in answers), time.perf_counter() - start)
        res[label + "_answers"] = [a.token_ids for a in answers]
    same = sum(a == b for a, b in zip(res.pop("one_forward_answers"), res.pop("forward_per_variant_answers")))
    res["speedup"] = round(res["one_forward"] / res["forward_per_variant"], 2)
    res["same_greedy_answers"] = same / (2 * len(prompts))
    print(f"[{name}] LoRA tuned + base at {c} rows: {json.dumps(res)}", flush=True)
    return res


def methods_single(name: str, max_new: int) -> dict:
    """Every method at one sequence against plain ``generate`` on its base model."""
    from chattune.methods import all_methods

    base, tok = load(name)
    prompt = prompts_for(tok, 1)[0]
    n = max_new

    def plain():
        x = torch.tensor([prompt], device=base.device)
        with torch.no_grad():
            base.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=tok.eos_token_id)

    plain()
    start = time.perf_counter()
    plain()
    ref = n / (time.perf_counter() - start)
    out = {"plain_generate": round(ref, 1)}
    for mname, method in all_methods().items():
        model, _ = load(name)
        model = method.apply(model, method.config_cls(), tok).eval()
        if method.inference is not None:
            method.inference(model)
        engine = Engine({"tuned": Variant(model)}, tok, eos_id=-1, max_batch=1)
        engine.run([Request(prompt, max_new_tokens=4, sampling=GREEDY)])
        start = time.perf_counter()
        engine.run([Request(prompt, max_new_tokens=n, sampling=GREEDY)])
        speed = n / (time.perf_counter() - start)
        out[mname] = {"tokens_per_s": round(speed, 1), "vs_plain_generate": round(speed / ref, 2)}
        print(f"[{name}] {mname} at 1 sequence: {out[mname]}", flush=True)
    return out


def drafts_check(name: str, max_new: int, template: str = "auto", n_req: int = 4) -> dict:
    """One sequence at a time (chat's case): the engine with and without speculative steps
    (prompt-lookup drafts, ``engine/lookup.py``), greedy and the shipped sampling, the same
    prompts; whether the answers are the same, and how many drafted tokens were kept."""
    from chattune.engine import DEFAULTS
    from chattune.engine.lookup import DRAFT_TOKENS

    model, tok = load(name)
    prompts = prompts_for(tok, n_req, template=template)
    out = {"template": template, "requests": len(prompts), "max_new_tokens": max_new}
    for label, sampling in (("greedy", GREEDY), ("sampled", DEFAULTS.with_(seed=0))):
        runs = {}
        for drafts in (0, DRAFT_TOKENS):
            engine = Engine({"tuned": Variant(model)}, tok, tok.eos_token_id, max_batch=1, draft_tokens=drafts)
            engine.run([Request(prompts[0], max_new_tokens=4, sampling=sampling)])  # warm-up
            engine.drafted = engine.kept = 0
            start = time.perf_counter()
            answers = engine.run([Request(p, max_new_tokens=max_new, sampling=sampling) for p in prompts])
            tokens = sum(len(a.token_ids) for a in answers)
            runs[drafts] = (rate(tokens, time.perf_counter() - start), [a.token_ids for a in answers], engine)
        (plain, a0, _), (fast, a1, eng) = runs[0], runs[DRAFT_TOKENS]
        out[label] = {"plain": plain, "drafts": fast, "speedup": round(fast / plain, 2),
                      "same_answers": sum(x == y for x, y in zip(a0, a1)) / len(prompts),
                      "kept_of_drafted": round(eng.kept / max(eng.drafted, 1), 2)}
        print(f"[{name}] one sequence, {label}, drafts off/on: {json.dumps(out[label])}", flush=True)
    return out


def phases(name: str, n_req: int, max_new: int, c: int = 16) -> dict:
    """One engine run of the ``--quick`` workload with its phases timed (prefill, decode
    steps by row count: ``eval_phases.py``'s timers)."""
    import eval_phases

    model, tok = load(name)
    prompts = prompts_for(tok, n_req, template="auto")
    engine_run({"tuned": Variant(model)}, tok, prompts[:2], 2, 4)  # warm-up
    eval_phases.instrument()
    tokens, secs, _ = engine_run({"tuned": Variant(model)}, tok, prompts, c, max_new)
    out = eval_phases.report(secs)
    out.update(tokens=tokens, tokens_per_s=rate(tokens, secs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only, its chat template, 16 sequences, 128 tokens")
    ap.add_argument("--models", default="smollm2-135m,gpt2")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least C)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (--quick: 128)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu_suite.sh)")
    ap.add_argument("--templates", default=None,
                    help="prompt templates, comma-separated (default: auto,seed; --quick: auto). auto is the "
                         "model's own chat template (answers end at their natural length), seed the seed's "
                         "'### Human:' format (an instruct model rarely ends those: answers run to the limit)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="turns each system takes per concurrency, alternating (default 1); 4 steadies the ratio "
                         "on a shared host")
    ap.add_argument("--drafts", action="store_true",
                    help="only the speculative-steps check: one sequence, drafts off and on (about 2 min)")
    ap.add_argument("--phases", action="store_true",
                    help="only one engine run of the --quick workload with its phases timed (about 1 min)")
    ap.add_argument("--llamacpp", action="store_true",
                    help="only the llama.cpp rows: 1 and 16 sequences, greedy and sampled (about 10 min)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.phases:
        print(json.dumps({"threads": torch.get_num_threads(), "phases": phases("smollm2-135m", 32, 128)}))
        return
    if args.drafts:
        result = {"threads": torch.get_num_threads(), "drafts": drafts_check("smollm2-135m", args.max_new_tokens or 128)}
        print(json.dumps(result))
        return
    if args.llamacpp:
        result = {"threads": torch.get_num_threads(), "llamacpp": llamacpp(args.models.split(",")[0], "auto", 8,
                                                                           args.max_new_tokens or 128, args.rounds or 1)}
        result.update({k: v for k, v in result["llamacpp"].items() if k.startswith("vs_llamacpp_")})
        print(json.dumps(result))
        return
    models = ["smollm2-135m"] if args.quick else args.models.split(",")
    conc = [16] if args.quick else [int(c) for c in args.concurrency.split(",")]
    n_req = 32 if args.quick else args.requests
    max_new = args.max_new_tokens or (128 if args.quick else 256)
    templates = (args.templates or ("auto" if args.quick else "auto,seed")).split(",")
    result = {"threads": torch.get_num_threads(), "models": {}}
    for name in models:
        for template in templates:
            table = model_table(name, conc, n_req, max_new, try_batch_api=not args.quick,
                                single=4 if args.quick else 8, template=template,
                                rounds=args.rounds or 1)
            result["models"][f"{name}/{template}"] = table
        if not args.quick:
            table["bf16"] = bf16_check(name, n_req, max_new)
            table["tuned_and_base"] = lanes_check(name, n_req, max_new)
            table["methods_single"] = methods_single(name, max_new)
            table["drafts"] = drafts_check(name, max_new)
    head = result["models"][f"{models[0]}/{templates[0]}"]
    at16 = next(r for r in head["rows"] if r["concurrent"] == 16)
    result["headline"] = f"{models[0]}/{templates[0]}"
    result["vs_hf_batched_16"] = at16["vs_hf_batched"]
    result["vs_hf_single"] = at16["vs_hf_single"]
    if not args.quick:  # --quick: the engine against HF only; --llamacpp for llama.cpp's rows
        result["llamacpp"] = llamacpp(models[0], templates[0], 8, max_new, args.rounds or 1)
        result.update({k: v for k, v in result["llamacpp"].items() if k.startswith("vs_llamacpp_")})
    print(json.dumps(result))


def llamacpp(name: str, template: str, single: int, max_new: int, rounds: int) -> dict:
    """llama.cpp against the engine: ``single`` prompts one at a time, 32 at 16 sequences."""
    model, tok = load(name)
    prompts = prompts_for(tok, 32, template=template)
    out = llamacpp_system.table(model, tok, _data.model_dir(name), template, prompts[:single], max_new,
                                rounds=rounds, wide_prompts=prompts)
    print(f"[{name}] llama.cpp: {json.dumps(out)}", flush=True)
    return out


if __name__ == "__main__":
    main()
