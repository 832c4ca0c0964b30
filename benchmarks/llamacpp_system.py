"""llama.cpp (through llama-cpp-python) as a decoding system for ``generation.py``.

SmolLM2's weights are written by chattune's own GGUF writer (``chattune export --format
gguf``'s ``write_model``) at f32, f16 and q8_0, then the same prompts are answered greedily,
one sequence at a time, with chattune's engine (one slot) and llama.cpp taking turns.
llama-cpp-python's ``Llama`` holds one sequence: no batched rows for llama.cpp here.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from chattune.engine import GREEDY, Engine, Request, Variant

QUANTS = ("f32", "f16", "q8_0")


def export(model, tok, tok_dir: Path, template: str, quant: str) -> Path:
    """The model as GGUF, cached under $CHATTUNE_CACHE/bench (written once per precision)."""
    from chattune.generate.gguf_export import write_model
    from chattune.models.loading import cache_dir

    path = cache_dir() / "bench" / f"{tok_dir.name}-{template}-{quant}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        write_model(tmp, model, tok, tok_dir, template, quant, tok_dir.name)
        tmp.rename(path)
    return path


def llama_answers(path: Path, prompts: list[list[int]], max_new: int, eos: set[int]) -> tuple[int, float, list]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=torch.get_num_threads(),
                          verbose=False)
    llm.generate(prompts[0][:8], temp=0.0, top_k=1)  # warm-up: the first graph build
    tokens, answers, start = 0, [], time.perf_counter()
    for p in prompts:
        out = []
        for tok in llm.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if tok in eos or len(out) == max_new:
                break
            out.append(tok)
        tokens += len(out)
        answers.append(out)
    return tokens, time.perf_counter() - start, answers


def engine_answers(model, tok, prompts: list[list[int]], max_new: int) -> tuple[int, float, list]:
    engine = Engine({"tuned": Variant(model)}, tok, tok.eos_token_id, max_batch=1)
    engine.run([Request(prompts[0], max_new_tokens=4, sampling=GREEDY)])  # warm-up
    start = time.perf_counter()
    answers = [engine.run([Request(p, max_new_tokens=max_new, sampling=GREEDY)])[0].token_ids for p in prompts]
    return sum(map(len, answers)), time.perf_counter() - start, answers


def table(model, tok, tok_dir: Path, template: str, prompts: list[list[int]], max_new: int, rounds: int = 1) -> dict:
    """tokens/s at one sequence: the engine and llama.cpp at each precision, and their ratio."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama_cpp does not import: make llamacpp (docs/gguf.md)"}
    files = {q: export(model, tok, tok_dir, template, q) for q in QUANTS}
    eos = {tok.eos_token_id}
    totals = {k: [0, 0.0] for k in ("chattune", *QUANTS)}
    answers = {}
    for r in range(rounds):  # the systems take turns; a shared host's slow minutes fall on all
        order = ["chattune", *QUANTS] if r % 2 == 0 else [*QUANTS, "chattune"]
        for system in order:
            if system == "chattune":
                t, s, answers[system] = engine_answers(model, tok, prompts, max_new)
            else:
                t, s, answers[system] = llama_answers(files[system], prompts, max_new, eos)
            totals[system][0] += t
            totals[system][1] += s
    out = {"requests": len(prompts), "max_new_tokens": max_new, "rounds": rounds,
           "chattune_single": round(totals["chattune"][0] / totals["chattune"][1], 1)}
    for q in QUANTS:
        out[f"llamacpp_{q}"] = round(totals[q][0] / totals[q][1], 1)
        out[f"same_greedy_answers_{q}"] = sum(a == b for a, b in zip(answers[q], answers["chattune"])) / len(prompts)
        out[f"file_mb_{q}"] = round(files[q].stat().st_size / 1e6, 1)
    out["vs_llamacpp_single"] = round(out["chattune_single"] / out["llamacpp_f32"], 2)
    return out
