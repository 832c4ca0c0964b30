"""llama.cpp (through llama-cpp-python) as a decoding system for ``generation.py``.

SmolLM2's weights are written by chattune's own GGUF writer (``chattune export --format
gguf``'s ``write_model``) at f32, f16 and q8_0, then the same prompts are answered by
chattune's engine and llama.cpp taking turns, at one sequence and at ``concurrent``
sequences, greedy and with the shipped sampling (top-k 50, top-p 0.9, temperature 0.7;
llama.cpp's sampler chain has no repetition penalty here, so its sampled rows do a little
less work than the engine's).

llama.cpp is driven through its C API (llama-cpp-python's ctypes bindings), as its own
``llama-parallel`` example does: one context holding ``concurrent`` sequences in a unified
KV cache, one ``llama_decode`` a step over every sequence's next token (a new prompt's
tokens join the same batch when a sequence ends and its slot frees: continuous batching),
greedy by argmax of the logits, sampled through llama.cpp's sampler chain. The high-level
``Llama`` class holds one sequence and samples in Python, which would charge llama.cpp
for Python it does not need.
"""

from __future__ import annotations

import ctypes
import json
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from chattune.engine import DEFAULTS, GREEDY, Engine, Request, Variant

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


_QUIET = None  # the no-op log callback (kept alive here while llama.cpp holds it)


class LlamaCpp:
    """A llama.cpp context of ``slots`` sequences on the GGUF file ``path``."""

    def __init__(self, path: Path, slots: int, context: int = 1024):
        import llama_cpp as lc

        self.lc, self.slots = lc, slots
        global _QUIET
        if _QUIET is None:  # llama.cpp's log lines would bury the benchmark's own
            _QUIET = lc.llama_log_callback(lambda level, text, data: None)
            lc.llama_log_set(_QUIET, ctypes.c_void_p(0))
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = context * slots, slots, True
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = torch.get_num_threads()
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(512, 0, 1)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def _sampler(self, seed: int):
        lc = self.lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        for s in (lc.llama_sampler_init_top_k(50), lc.llama_sampler_init_top_p(0.9, 1),
                  lc.llama_sampler_init_temp(0.7), lc.llama_sampler_init_dist(seed)):
            lc.llama_sampler_chain_add(chain, s)
        return chain

    def _decode(self, feed: list[tuple[int, int, int, bool]], samplers: dict) -> dict[int, int]:
        """Decode ``feed`` (token, position, sequence, wants logits) in batches of 512 and
        choose the next token where logits are wanted, before the next batch overwrites
        them; returns those tokens by their place in ``feed``."""
        lc, b, out = self.lc, self.batch, {}
        for start in range(0, len(feed), 512):
            chunk = feed[start:start + 512]
            b.n_tokens = 0
            for k, (token, pos, seq, logits) in enumerate(chunk):
                b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = token, pos, 1, logits
                b.seq_id[k][0] = seq
                b.n_tokens += 1
            if lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            out.update({start + k: self._next(k, samplers[seq]) for k, (_, _, seq, logits) in enumerate(chunk) if logits})
        return out

    def _next(self, index: int, sampler) -> int:
        if sampler is not None:
            return self.lc.llama_sampler_sample(sampler, self.ctx, index)
        row = self.lc.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(row, shape=(self.vocab,)).argmax())

    def answers(self, prompts: list[list[int]], max_new: int, eos: set[int], sampled: bool = False) -> list[list[int]]:
        """Every prompt's answer, up to ``slots`` at once (continuous batching)."""
        lc, memory = self.lc, self.lc.llama_get_memory(self.ctx)
        lc.llama_memory_clear(memory, True)
        waiting, active, done = deque(enumerate(prompts)), {}, {}
        samplers = {s: self._sampler(s) if sampled else None for s in range(self.slots)}
        while waiting or active:
            feed, owners = [], []
            for slot in range(self.slots):
                if slot not in active and waiting:
                    index, prompt = waiting.popleft()
                    lc.llama_memory_seq_rm(memory, slot, -1, -1)
                    if samplers[slot] is not None:
                        lc.llama_sampler_reset(samplers[slot])
                    feed += [(t, i, slot, i == len(prompt) - 1) for i, t in enumerate(prompt)]
                    owners.append((slot, len(feed) - 1))
                    active[slot] = [index, len(prompt), []]
                elif slot in active:
                    _, pos, out = active[slot]
                    feed.append((out[-1], pos, slot, True))
                    owners.append((slot, len(feed) - 1))
                    active[slot][1] += 1
            chosen = self._decode(feed, samplers)
            for slot, at in owners:
                token = chosen[at]
                index, _, out = active[slot]
                if token in eos or len(out) == max_new:
                    done[index] = out
                    del active[slot]
                    continue
                out.append(token)
                if len(out) == max_new:
                    done[index] = out
                    del active[slot]
        for sampler in samplers.values():
            if sampler is not None:
                lc.llama_sampler_free(sampler)
        return [done[i] for i in range(len(prompts))]


def llama_answers(path: Path, prompts: list[list[int]], max_new: int, eos: set[int], slots: int = 1,
                  sampled: bool = False) -> tuple[int, float, list]:
    llm = LlamaCpp(path, slots)
    try:
        llm.answers([prompts[0][:8]], 2, eos)  # warm-up: the first graph build
        start = time.perf_counter()
        answers = llm.answers(prompts, max_new, eos, sampled)
        seconds = time.perf_counter() - start
    finally:
        llm.close()
    return sum(map(len, answers)), seconds, answers


def engine_answers(model, tok, prompts: list[list[int]], max_new: int, slots: int = 1,
                   sampled: bool = False) -> tuple[int, float, list]:
    engine = Engine({"tuned": Variant(model)}, tok, tok.eos_token_id, max_batch=slots)
    engine.run([Request(prompts[0], max_new_tokens=4, sampling=GREEDY)])  # warm-up
    reqs = [Request(p, max_new_tokens=max_new, sampling=DEFAULTS.with_(seed=i) if sampled else GREEDY)
            for i, p in enumerate(prompts)]
    start = time.perf_counter()
    answers = [a.token_ids for a in engine.run(reqs)]
    return sum(map(len, answers)), time.perf_counter() - start, answers


# (sequences at once, sampled, llama.cpp precisions): the workloads, each against the engine
WORKLOADS = ((1, False, QUANTS), (1, True, ("f32", "f16")), (16, False, ("f32", "f16")), (16, True, ("f32",)))


def table(model, tok, tok_dir: Path, template: str, prompts: list[list[int]], max_new: int, rounds: int = 1,
          wide_prompts: list[list[int]] | None = None) -> dict:
    """tokens/s of the engine and llama.cpp at each precision, one sequence (``prompts``) and
    16 at once (``wide_prompts``, default ``prompts``), greedy and sampled, and their ratios."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama_cpp does not import: make llamacpp (docs/gguf.md)"}
    files = {q: export(model, tok, tok_dir, template, q) for q in QUANTS}
    eos = {tok.eos_token_id}
    out = {"requests": len(prompts), "requests_16": len(wide_prompts or prompts), "max_new_tokens": max_new,
           "rounds": rounds}
    for slots, sampled, quants in WORKLOADS:
        work = prompts if slots == 1 else (wide_prompts or prompts)
        totals = {k: [0, 0.0] for k in ("chattune", *quants)}
        answers = {}
        for r in range(rounds):  # the systems take turns; a shared host's slow minutes fall on all
            order = ["chattune", *quants] if r % 2 == 0 else [*quants, "chattune"]
            for system in order:
                if system == "chattune":
                    t, sec, answers[system] = engine_answers(model, tok, work, max_new, slots, sampled)
                else:
                    t, sec, answers[system] = llama_answers(files[system], work, max_new, eos, slots, sampled)
                totals[system][0] += t
                totals[system][1] += sec
        label = f"{slots}_{'sampled' if sampled else 'greedy'}"
        out[f"chattune_{label}"] = round(totals["chattune"][0] / totals["chattune"][1], 1)
        for q in quants:
            out[f"llamacpp_{q}_{label}"] = round(totals[q][0] / totals[q][1], 1)
            out[f"vs_llamacpp_{q}_{label}"] = round(out[f"chattune_{label}"] / out[f"llamacpp_{q}_{label}"], 2)
            if not sampled:
                same = sum(a == b for a, b in zip(answers[q], answers["chattune"])) / len(work)
                out[f"same_greedy_answers_{q}_{label}"] = round(same, 2)
        print(f"llama.cpp, {label}: {json.dumps({k: v for k, v in out.items() if label in k})}", flush=True)
    for q in QUANTS:
        out[f"file_mb_{q}"] = round(files[q].stat().st_size / 1e6, 1)
    for key, source in (("vs_llamacpp_single", "1_greedy"), ("vs_llamacpp_single_sampled", "1_sampled"),
                        ("vs_llamacpp_16", "16_greedy"), ("vs_llamacpp_16_sampled", "16_sampled")):
        out[key] = out.get(f"vs_llamacpp_f32_{source}")
    return out
