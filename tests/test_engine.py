"""The decoding engine: batched == sequential greedy for every method x architecture,
continuous batching, per-row sampling, stop strings, streaming, cancellation."""

from __future__ import annotations

import copy

import pytest
import torch

from chattune.data import DataConfig, prepare
from chattune.engine import GREEDY, Engine, Request, SamplingParams, Variant
from chattune.engine.sampling import penalise
from chattune.engine.text import TextTracker
from chattune.generate.loaded import method_variants
from chattune.methods import get_method
from tiny import make_model, make_tokenizer

METHODS = ["lora", "dora", "ia3", "adapter", "prompt", "prefix", "full"]
ARCHS = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Six prompts of different lengths (5 to 30 tokens)."""
    data = prepare(DataConfig(max_length=128), tokenizer)
    rows = [s["input_ids"] for s in data.splits["train"][:6]]
    return [ids[: 5 + 5 * i] for i, ids in enumerate(rows)]


def tuned(method: str, arch: str, tokenizer):
    """A method applied to a tiny model and moved off its identity, in eval mode."""
    m = get_method(method)
    base = make_model(arch, len(tokenizer)).eval()
    model = m.apply(copy.deepcopy(base), m.config_cls(), tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.02 if method == "full" else 0.1))
    return m, model.eval(), base


@torch.no_grad()
def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Argmax of full forwards without any cache: the definition of greedy decoding."""
    seq, out = list(prompt), []
    for _ in range(n):
        ids = torch.tensor([seq])
        token = int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax())
        out.append(token)
        seq.append(token)
    return out


def variants_of(m, model, base) -> dict[str, Variant]:
    """tuned and base as ``LoadedRun.variants`` builds them: one lane where the method routes rows."""
    if m.disable is None:
        return {"tuned": Variant(model), "base": Variant(base)}
    virtual = getattr(model, "active_peft_config", None)
    virtual = virtual.num_virtual_tokens if virtual is not None and virtual.is_prompt_learning else 0
    return method_variants(m, model, virtual)


RUNS = {"planned": None, "row_by_row": (0, 1.0), "one_run": (10**12, 1.0)}  # attention.plan_runs' costs


@pytest.mark.parametrize("runs", list(RUNS))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_batched_greedy_equals_sequential_greedy(method, arch, runs, tokenizer, prompts, monkeypatch):
    """Also with padded decode steps attending in runs of rows as planned, row by row, or
    all rows in one masked run (attention.plan_runs), and with every linear layer on the
    packed kernel (engine/packed.py), tiny ones included."""
    from chattune.models import attention
    from chattune.engine import packed

    calls, packed_calls = [], []
    in_runs, packed_forward = attention._runs_decode, packed._forward
    monkeypatch.setattr(attention, "_runs_decode", lambda *a: calls.append(a[3]) or in_runs(*a))
    if RUNS[runs]:
        monkeypatch.setattr(attention, "CALL_COST", RUNS[runs][0])
        monkeypatch.setattr(attention, "ALONE_COST", RUNS[runs][1])
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(packed, "_forward", lambda *a: packed_calls.append(1) or packed_forward(*a))
    m, model, base = tuned(method, arch, tokenizer)
    engine = Engine(variants_of(m, model, base), tokenizer, eos_id=-1, max_batch=4)  # 4 slots: rows come and go
    lengths = [3, 9, 5, 12, 4, 7]
    reqs = [Request(p, max_new_tokens=n, sampling=GREEDY, variant=v)
            for v in ("tuned", "base") for p, n in zip(prompts, lengths)]
    reqs.insert(3, Request(prompts[1], max_new_tokens=9, sampling=GREEDY))  # shares prompts[1]'s prefill
    reqs.insert(5, Request(prompts[1], max_new_tokens=9, sampling=GREEDY, variant="base"))  # a mixed lane
    answers = engine.run(reqs)
    assert answers[3].token_ids == answers[1].token_ids
    del reqs[5], answers[5], reqs[3], answers[3]
    for r, a in zip(reqs, answers):
        ref_model = model if r.variant == "tuned" else (base if m.disable is None else None)
        if ref_model is None:
            with m.disable(model):
                want = greedy_reference(model, r.prompt_ids, r.max_new_tokens)
        else:
            want = greedy_reference(ref_model, r.prompt_ids, r.max_new_tokens)
        assert a.token_ids == want, (r.variant, len(r.prompt_ids))
        assert a.finish_reason == "length"
    # the base rows really are the base model
    assert [a.token_ids for a in answers[6:]] == [greedy_reference(base, p, n) for p, n in zip(prompts, lengths)]
    assert calls  # padded steps ran in runs
    sizes = [r.end - r.first for step in calls for r in step.runs]
    if runs == "row_by_row":
        assert set(sizes) == {1}
    if runs == "one_run":
        assert all(len(step.runs) == 1 for step in calls) and any(step.runs[0].keep is not None for step in calls)
    # rows checked drafts in steps with other rows (engine/lookup.py)
    assert any(step.scatter is not None and len(step.scatter) > max(r.tokens for r in step.runs) for step in calls)
    assert packed_calls


@pytest.mark.parametrize("max_batch", [1, 4], ids=["alone", "batched"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_speculative_steps_give_the_answers_of_plain_steps(method, arch, max_batch, tokenizer, prompts, monkeypatch):
    """Rows check tokens drafted from their history (engine/lookup.py) in the step's forward,
    alone or among other rows (which then lag behind or run ahead of each other); greedy
    and seeded sampled answers are those of one token a step, with the n-gram drafts and
    with drafts that are partly right (the keep-then-reject path)."""
    from chattune.engine import lookup

    m, model, base = tuned(method, arch, tokenizer)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.1, seed=5)
    variants = ["tuned", "base"] if max_batch > 1 else ["tuned"]  # batched: tuned and base rows of one lane too
    reqs = [(p, s, v) for p in prompts[:3] for s in (GREEDY, sampled) for v in variants]

    def answers(draft_tokens: int) -> tuple[list[list[int]], Engine]:
        engine = Engine(variants_of(m, model, base), tokenizer, eos_id=-1, max_batch=max_batch, draft_tokens=draft_tokens)
        got = engine.run([Request(p, max_new_tokens=24, sampling=s, variant=v) for p, s, v in reqs])
        return [a.token_ids for a in got], engine

    plain, off = answers(0)
    assert off.drafted == 0
    assert answers(4)[0] == plain  # the n-gram drafts (tiny random models rarely repeat: mostly rejected)
    for (p, s, v), got in zip(reqs, plain):
        if s is GREEDY and v == "tuned":
            assert got == greedy_reference(model, p, 24)

    def partly_right(self, limit=4):  # a plain answer's next tokens, the last one wrong at every other step
        h = self.history
        for (p, _, _), answer in zip(reqs, plain):
            done = h[len(p):]
            if h[:len(p)] == p and answer[:len(done)] == done:
                future = answer[len(done):len(done) + limit]
                return future[:-1] + [(future[-1] + 1) % len(tokenizer)] if future and len(h) % 2 else future
        return []

    monkeypatch.setattr(lookup.Lookup, "draft", partly_right)
    drafted, on = answers(4)
    assert drafted == plain
    assert on.kept > 0 and on.drafted > on.kept  # drafts kept, and some rejected


def test_speculative_steps_stop_at_the_context(tokenizer, monkeypatch):
    """GPT-2 has 512 learned positions: drafts never feed a position past them."""
    from chattune.engine import lookup

    _, model, _ = tuned("lora", "gpt2", tokenizer)
    monkeypatch.setattr(lookup.Lookup, "draft", lambda self, limit=4: [5] * limit)  # a draft at every step,
    monkeypatch.setattr(lookup.Lookup, "wanted", lambda self, limit=4: limit)  # however many were rejected
    prompt = [5, 9, 2, 7] * 126  # 504 tokens
    engine = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1, max_batch=1, draft_tokens=4)
    answer = engine.run([Request(prompt, max_new_tokens=50, sampling=GREEDY)])[0]
    assert answer.finish_reason == "length" and len(answer.token_ids) == 512 - 504
    assert engine.drafted > 0


def test_lora_tuned_and_base_rows_share_one_forward_per_step(tokenizer, prompts, monkeypatch):
    m, model, base = tuned("lora", "llama", tokenizer)
    from peft.tuners.lora import LoraLayer

    # rows are routed by per-row LoRA scaling (methods/peft_methods.route_lora), not PEFT's mixed batches
    monkeypatch.setattr(LoraLayer, "_mixed_batch_forward", lambda *a, **k: pytest.fail("PEFT's mixed batch ran"))
    engine = Engine(variants_of(m, model, base), tokenizer, eos_id=-1, max_batch=4)
    for v in ("tuned", "base", "tuned", "base"):
        engine.add(Request(prompts[2], max_new_tokens=6, sampling=GREEDY, variant=v))
    calls = []
    hook = model.get_base_model().register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape),
                                                            with_kwargs=True)
    try:
        steps, answers = 0, []
        while engine.has_work():
            answers += engine.step()
            steps += 1
    finally:
        hook.remove()
    decode = [shape for shape in calls if shape[1] == 1]
    assert len(decode) == steps and all(shape[0] == 4 for shape in decode)  # one 4-row forward per step
    assert [shape[0] for shape in calls if shape[1] > 1] == [2]  # one prefill: a row per (variant, prompt)
    for a in answers:
        assert a.token_ids == greedy_reference(model if a.request.variant == "tuned" else base, prompts[2], 6)


def test_lora_on_embeddings_routes_tuned_and_base_rows_through_peft_mixed_batches(tokenizer, prompts, monkeypatch):
    """A LoRA layer that is not a plain linear (here the embeddings) makes route_lora fall
    back to PEFT's mixed batches, in prefill and decode steps alike."""
    from peft.tuners.lora import LoraLayer

    mixed, inner = [], LoraLayer._mixed_batch_forward
    monkeypatch.setattr(LoraLayer, "_mixed_batch_forward",
                        lambda self, x, *a, **k: mixed.append(x.shape[1]) or inner(self, x, *a, **k))
    m = get_method("lora")
    base = make_model("llama", len(tokenizer)).eval()
    model = m.apply(copy.deepcopy(base), m.config_cls(target_modules=["q_proj", "v_proj", "embed_tokens"]), tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    engine = Engine(variants_of(m, model, base), tokenizer, eos_id=-1, max_batch=8)
    reqs = [Request(p, max_new_tokens=5, sampling=GREEDY, variant=v) for p in prompts[:3] for v in ("tuned", "base")]
    for r, a in zip(reqs, engine.run(reqs)):
        assert a.token_ids == greedy_reference(model if r.variant == "tuned" else base, r.prompt_ids, 5), r.variant
    assert 1 in mixed and max(mixed) == len(prompts[2])  # decode steps, and one prefill of all six rows


def test_a_prompts_requests_join_together_and_lanes_prefill_their_variants_together(tokenizer, prompts):
    """A prompt's requests queued one after another are admitted together (up to max_batch
    / 8 rows over max_batch) and prefill in one forward, tuned and base rows of different
    lengths too; the answers are those of one request at a time."""
    m, model, base = tuned("lora", "llama", tokenizer)
    engine = Engine(variants_of(m, model, base), tokenizer, eos_id=-1, max_batch=8)
    calls = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda mod, args, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    reqs = [Request(p, max_new_tokens=20 - 16 * (i == 0), sampling=GREEDY) for i, p in enumerate(prompts[:2] * 4)]
    reqs += [Request(prompts[3], max_new_tokens=5, sampling=GREEDY, variant=v) for v in ("tuned", "base", "tuned")]
    reqs += [Request(prompts[1], max_new_tokens=5, sampling=GREEDY, variant="base")]
    try:
        for r in reqs:
            engine.add(r)
        active, answers = [], []
        while engine.has_work():
            answers += engine.step()
            active.append(engine.active)
    finally:
        hook.remove()
    assert max(active) == 9  # one row over max_batch: two requests of prompts[3] joined in one step
    prefills = [shape for shape in calls if shape[1] > 1]
    # the first 8 (prompts of 5 and 10 tokens): a row per prompt; when the 4-token answer
    # ends, tuned and base prompts[3] (20 tokens) in one forward; then one slot at a time
    assert prefills == [(2, 10), (2, 20), (1, 20), (1, 10)]
    # tuned and base rows of different lengths in one left-padded forward
    engine = Engine(variants_of(m, model, base), tokenizer, eos_id=-1, max_batch=8)
    calls.clear()
    hook = model.get_base_model().register_forward_pre_hook(
        lambda mod, args, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        answers += engine.run([Request(prompts[0], max_new_tokens=5, sampling=GREEDY),
                               Request(prompts[3], max_new_tokens=5, sampling=GREEDY, variant="base")])
    finally:
        hook.remove()
    assert [shape for shape in calls if shape[1] > 1] == [(2, 20)]
    for a in answers:
        want = greedy_reference(model if a.request.variant == "tuned" else base, a.request.prompt_ids,
                                a.request.max_new_tokens)
        assert a.token_ids == want


def test_prompts_admitted_together_prefill_together_at_most_half_padding(tokenizer, prompts):
    _, model, _ = tuned("lora", "llama", tokenizer)
    calls = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda mod, args, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    base = prompts[5]  # 30 tokens
    try:
        engine = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1, max_batch=8)
        together = engine.run([Request(p, max_new_tokens=3, sampling=GREEDY) for p in prompts[:4]])
        first = [c for c in calls if c[1] > 1]
        calls.clear()
        # three 5-token prompts and a 30-token one: one forward would be mostly padding
        engine.run([Request(p, max_new_tokens=3, sampling=GREEDY) for p in (base[:5], base[1:6], base[2:7], base)])
        second = [c for c in calls if c[1] > 1]
    finally:
        hook.remove()
    assert first == [(4, 20)]  # prompts of 5, 10, 15 and 20 tokens, left-padded to 20
    assert sorted(second) == [(1, 30), (3, 5)]
    for p, a in zip(prompts[:4], together):
        assert a.token_ids == greedy_reference(model, p, 3)


def test_continuous_batching_refills_free_slots(tokenizer, prompts):
    _, model, _ = tuned("lora", "llama", tokenizer)
    engine = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1, max_batch=2)
    long = engine.add(Request(prompts[0], max_new_tokens=20, sampling=GREEDY))
    for p in prompts[1:4]:
        engine.add(Request(p, max_new_tokens=2, sampling=GREEDY))
    finished = []
    while engine.has_work():
        finished += [a.request for a in engine.step()]
        assert engine.active <= 2
    # the three short answers went through the second slot while the long one kept decoding
    assert finished[-1] is long and len(finished) == 4


def test_seeded_sampling_is_reproducible_and_seeds_differ(tokenizer, prompts):
    _, model, _ = tuned("lora", "gpt2", tokenizer)
    engine = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1, max_batch=8)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, repetition_penalty=1.2, seed=7)
    first = engine.run([Request(prompts[2], max_new_tokens=16, sampling=params)])[0].token_ids
    # again, this time beside other rows with other settings
    others = [Request(p, max_new_tokens=16, sampling=params.with_(seed=i)) for i, p in enumerate(prompts)]
    again = engine.run(others + [Request(prompts[2], max_new_tokens=16, sampling=params)])
    assert again[-1].token_ids == first
    assert len({tuple(a.token_ids) for a in again[:-1]}) > 1


def test_top_k_one_is_greedy(tokenizer, prompts):
    _, model, _ = tuned("ia3", "llama", tokenizer)
    engine = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1)
    sampled = engine.run([Request(prompts[1], max_new_tokens=10, sampling=SamplingParams(1.3, 1.0, 1, 1.0, seed=3))])
    assert sampled[0].token_ids == greedy_reference(model, prompts[1], 10)


def test_repetition_penalty_touches_only_generated_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = penalise(logits, seen, torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


@torch.no_grad()
def penalised_reference(model, prompt: list[int], n: int, penalty: float) -> list[int]:
    """Greedy with CTRL's penalty on the generated tokens only, by full forwards without a cache."""
    seq, out = list(prompt), []
    for _ in range(n):
        ids = torch.tensor([seq])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
        for t in set(out):
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


def test_prompt_tokens_and_eos_are_not_penalised(tokenizer):
    """A token of the prompt keeps its logit; EOS (in a prompt, every earlier answer ends
    with it) still ends the answer."""
    _, model, _ = tuned("lora", "gpt2", tokenizer)
    prompt = prepare(DataConfig(max_length=128), tokenizer).splits["train"][0]["input_ids"][:60]
    reference = penalised_reference(model, prompt, 10, 50.0)
    repeated = [k for k, t in enumerate(reference) if t in prompt]
    assert repeated, "the answer must repeat a prompt token, or the claim is not exercised"
    strong = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=50.0)
    plain = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1)
    assert plain.run([Request(prompt, max_new_tokens=10, sampling=strong)])[0].token_ids == reference
    k = repeated[0]
    eos = reference[k]  # a token of the prompt, chosen at step k: make it the EOS
    engine = Engine({"tuned": Variant(model)}, tokenizer, eos_id=eos)
    a = engine.run([Request(prompt, max_new_tokens=10, sampling=strong)])[0]
    assert a.finish_reason == "eos" and a.token_ids == reference[:k]


class Spy:
    def __init__(self):
        self.parts = []

    def __call__(self, text):
        self.parts.append(text)


def test_stop_strings_are_cut_and_never_streamed(tokenizer):
    spy = Spy()
    tracker = TextTracker(tokenizer, ["### Human:"], spy)
    stopped = False
    for token in tokenizer("Sure thing.\n\n### Human: more", add_special_tokens=False)["input_ids"]:
        stopped = tracker.add(token)
        if stopped:
            break
    assert stopped
    assert tracker.text == "Sure thing.\n\n" == "".join(spy.parts)


def test_streamed_text_equals_the_answer(tokenizer, prompts):
    _, model, _ = tuned("prefix", "llama", tokenizer)
    engine = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1, max_batch=3)
    spies = [Spy() for _ in prompts]
    answers = engine.run([Request(p, max_new_tokens=12, sampling=GREEDY, on_text=s) for p, s in zip(prompts, spies)])
    for a, s in zip(answers, spies):
        assert "".join(s.parts) == a.text == tokenizer.decode(a.token_ids, skip_special_tokens=True)


def test_cancel_frees_the_slot(tokenizer, prompts):
    _, model, _ = tuned("lora", "gpt2", tokenizer)
    engine = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1, max_batch=1)
    first = engine.add(Request(prompts[0], max_new_tokens=100, sampling=GREEDY))
    second = engine.add(Request(prompts[1], max_new_tokens=3, sampling=GREEDY))
    engine.step()
    engine.cancel(first)
    done = []
    while engine.has_work():
        done += engine.step()
    assert [(a.request, a.finish_reason) for a in done] == [(first, "cancelled"), (second, "length")]


def test_prompt_longer_than_the_context_is_refused(tokenizer):
    from chattune.engine import PromptTooLong

    _, model, _ = tuned("prompt", "gpt2", tokenizer)  # 512 positions, 20 virtual tokens
    engine = Engine({"tuned": Variant(model, virtual_tokens=20)}, tokenizer, eos_id=-1)
    with pytest.raises(PromptTooLong, match="512"):
        engine.add(Request([5] * 500))
