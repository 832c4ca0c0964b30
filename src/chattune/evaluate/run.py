"""One evaluation of a run: answers from the tuned and the base model under two decodings,
decoded together by the engine, then the metrics, the reference-answer loss and the judge.

The base numbers come from the same loaded model with the method switched off
(``Method.disable``), never from a second model the adapter was injected into: that was
the seed notebook's mistake (``PeftModel.from_pretrained`` modifies its base in place).
"""

from __future__ import annotations

import statistics
import zlib
from collections import Counter

from tqdm.auto import tqdm

from chattune.data import prepare, tokenize_conversation
from chattune.data.questions import QuestionSet, question_of, read_questions
from chattune.engine import DEFAULTS, GREEDY, PromptTooLong
from chattune.errors import UserError
from chattune.evaluate.metrics import answer_metrics, loss_interval, paired_stops, reference_metrics
from chattune.training.passes import loss_on_samples

# The headline is what users get (chat's shipped sampling, seeded per prompt); greedy is a
# diagnostic: it shows loops the sampling hides.
DECODINGS = {"sampled": DEFAULTS, "greedy": GREEDY}
HEADLINE = "sampled"


def evaluate_run(run, split: str = "test", *, prompts: str | None = None, fmt: str = "auto", turns: str = "first",
                 reference_model: str | None = None, num_prompts: int | None = None, max_samples: int | None = None,
                 max_new_tokens: int | None = None, include_base: bool = True,
                 decodings: tuple[str, ...] = ("sampled", "greedy"), seed: int = 0, max_batch: int = 32,
                 judge=None) -> dict:
    """Evaluate a loaded run (``generate.LoadedRun``) on its held-out ``split`` or on ``prompts``.

    Returns the result: ``tuned``/``base`` (loss, and one metrics dict per decoding),
    ``reference`` (the anchor row), ``paired``, ``prompts`` (what was read and dropped),
    ``answers`` (every answer) and, with ``judge``, ``judge``.
    """
    cfg = run.cfg
    unknown = [d for d in decodings if d not in DECODINGS]
    if unknown or not decodings:
        raise UserError(f"decodings: choose from {', '.join(DECODINGS)}")
    if judge is not None:
        judge.check()  # an unreachable judge fails now, not after the decoding
    n = cfg.eval.num_generate if num_prompts is None else num_prompts
    budget = max_new_tokens or cfg.eval.max_new_tokens
    pairs = None
    if cfg.train.objective != "sft":  # a preference run is also judged on its held-out pairs
        from chattune.models.loading import autocast_dtype
        from chattune.evaluate.pairs import pair_accuracies

        device = next(run.model.parameters()).device
        pairs, held_out = pair_accuracies(run, split, max_samples, device, autocast_dtype(cfg.train.precision, device))
    if prompts is None and pairs is not None:  # the held-out pairs' prompts, the chosen answer as reference
        qs = QuestionSet(f"held-out pairs ({split} split)", cfg.data.format,
                         [question_of({"id": p["id"], "messages": p["chosen"]}, turns) for p in held_out],
                         rows_read=len(held_out))
        samples = None
    elif prompts is None:
        qs, samples = _split_questions(run, split, turns, max_samples)
    else:
        qs = read_questions(prompts, fmt, turns, reference_model, cfg.data)
        samples = None
    qs.select(n)
    engine = run.engine(base=include_base, max_batch=max_batch)
    models = ["tuned", "base"] if include_base else ["tuned"]
    answers, skipped = _decode(run, engine, qs, models, decodings, budget, seed)
    if samples is None:
        samples = _reference_samples(run, qs, {r["prompt_index"] for r in answers})
    result = {"split": split if prompts is None else None, "method": cfg.method.name,
              "prompts": _prompt_info(qs, prompts, skipped), "samples": len(samples),
              "settings": {"max_new_tokens": budget, "decodings": {d: DECODINGS[d].__dict__ for d in decodings},
                           "headline": HEADLINE if HEADLINE in decodings else decodings[0], "seed": seed}}
    result.update(_metrics(run, qs, answers, samples, models, decodings))
    if pairs is not None:
        result["pairs"] = pairs
    # token ids served the metrics; the result (answers.jsonl, result.json) keeps the text
    result["answers"] = [{k: v for k, v in r.items() if k != "token_ids"} for r in answers]
    if judge is not None and include_base:
        result["judge"] = judge.compare(qs, result["answers"], result["settings"]["headline"])
    return result


def _split_questions(run, split: str, turns: str, max_samples: int | None) -> tuple[QuestionSet, list[dict]]:
    data = prepare(run.cfg.data, run.tokenizer)
    if split not in data.splits:
        raise UserError(f"unknown split '{split}': choose train, validation or test")
    samples = data.splits[split][: max_samples or run.cfg.eval.max_samples or None]
    if not samples:
        raise UserError(f"the {split} split is empty")
    held_out = [c for c in data.conversations.samples if c["split"] == split]
    qs = QuestionSet(f"{data.conversations.source} ({split} split)", data.conversations.format,
                     [question_of(c, turns) for c in held_out], rows_read=len(held_out))
    return qs, samples


def _decode(run, engine, qs: QuestionSet, models: list[str], decodings, budget: int, seed: int):
    """Every (question, model, decoding) answered in one engine: continuous batching mixes
    them, and a second turn is queued as soon as its first answer is done."""
    skipped: Counter = Counter()
    answers: list[dict] = []

    def request(qi: int, model: str, decoding: str, turn: int, conversation: list[dict]):
        sampling = DECODINGS[decoding]
        if not sampling.greedy:  # the same seed for tuned and base: a paired comparison
            key = zlib.crc32(qs.questions[qi].id.encode())
            sampling = sampling.with_(seed=(seed * 1_000_003 + key + turn) % 2**62)
        return run.request(conversation, max_new_tokens=budget, sampling=sampling, variant=model,
                           tag=(qi, model, decoding, turn))

    total = 0
    for qi, q in enumerate(qs.questions):
        first = [request(qi, m, d, 0, [{"role": "user", "content": q.turns[0]}]) for m in models for d in decodings]
        try:
            for req in first:
                engine.check_length(req)
        except PromptTooLong:
            skipped["prompt_too_long"] += 1
            continue
        for req in first:
            engine.add(req)
        total += len(first) * len(q.turns)
    if not total:
        raise UserError(f"every prompt is longer than the model's context ({engine.context_size} tokens)")
    with tqdm(total=total, desc="answers", unit="answer", leave=False) as bar:
        while engine.has_work():
            for a in engine.step():
                qi, model, decoding, turn = a.tag
                q = qs.questions[qi]
                answers.append({"prompt_id": q.raw_id if q.raw_id is not None else q.id, "prompt_index": qi,
                                "turn": turn, "model": model, "decoding": decoding, "prompt": q.turns[turn], "text": a.text.strip(),
                                "stopped": a.stopped, "finish_reason": a.finish_reason,
                                "tokens": len(a.token_ids), "token_ids": a.token_ids})
                bar.update(1)
                if turn + 1 < len(q.turns):
                    conv = [{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": a.text.strip()},
                            {"role": "user", "content": q.turns[1]}]
                    try:
                        engine.add(request(qi, model, decoding, turn + 1, conv))
                    except PromptTooLong:
                        skipped["second_turn_too_long"] += 1
                        bar.update(1)
    answers.sort(key=lambda r: (r["prompt_index"], r["model"] != "tuned", r["decoding"], r["turn"]))
    return answers, skipped


def _reference_samples(run, qs: QuestionSet, answered: set[int]) -> list[dict]:
    """Each answered question's first turn and its reference answer, tokenised as training renders them."""
    out = []
    for qi, q in enumerate(qs.questions):
        if q.reference is None or qi not in answered:
            continue
        conv = [{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": q.reference}]
        tokens = tokenize_conversation(conv, run.tokenizer, run.cfg.data)
        if tokens is not None:
            out.append({"input_ids": tokens[0], "labels": tokens[1], "id": q.id})
    return out


def _prompt_info(qs: QuestionSet, path: str | None, skipped: Counter) -> dict:
    return {"source": qs.source, "file": path, "format": qs.format, "rows_read": qs.rows_read,
            "dropped": dict(qs.dropped), "skipped": dict(skipped), "used": len(qs.questions) - skipped["prompt_too_long"],
            "with_reference": len(qs.questions) - qs.without_reference, "reference_model": qs.reference_model,
            "id_key": qs.id_key}


def _metrics(run, qs: QuestionSet, answers: list[dict], samples: list[dict], models, decodings) -> dict:
    from chattune.models.loading import autocast_dtype

    encode = run.tokenizer
    refs = {qi: encode(q.reference, add_special_tokens=False)["input_ids"]
            for qi, q in enumerate(qs.questions) if q.reference is not None}
    used = {r["prompt_index"] for r in answers}
    ref_tokens = [refs[qi] for qi in sorted(used) if qi in refs]
    ref_median = float(statistics.median(len(t) for t in ref_tokens)) if ref_tokens else None
    n = len(qs.questions)
    rows = {(m, d): [dict(r, prompt=r["prompt_index"], tokens=r["token_ids"], finish=r["finish_reason"],
                          reference=qs.questions[r["prompt_index"]].reference)
                     for r in answers if r["model"] == m and r["decoding"] == d] for m in models for d in decodings}
    device = next(run.model.parameters()).device
    dtype = autocast_dtype(run.cfg.train.precision, device)
    out: dict = {}
    for m in models:
        out[m] = _loss(run, m, samples, device, dtype)
        for d in decodings:
            out[m][d] = answer_metrics(rows[(m, d)], n, ref_median)
            out[m][d]["samples"] = [{"prompt": qs.questions[r["prompt"]].turns[r["turn"]], "answer": r["text"],
                                     "stopped": r["finish"] == "eos"} for r in rows[(m, d)][:8]]
    if ref_tokens:
        ref_texts = [qs.questions[qi].reference for qi in sorted(used) if qi in refs]
        out["reference"] = reference_metrics(ref_tokens, ref_texts)
    if "base" in models:
        out["paired"] = {d: paired_stops(rows[("tuned", d)], rows[("base", d)]) for d in decodings}
    return out


def _loss(run, model_name: str, samples: list[dict], device, dtype) -> dict:
    if not samples:
        return {}
    args = (samples, run.tokenizer.pad_token_id, run.cfg.eval.batch_size, device, dtype)
    if model_name == "tuned":
        out = loss_on_samples(run.model, *args)
    else:
        with run.base() as base:
            out = loss_on_samples(base, *args)
    out["loss_ci"] = loss_interval(out.pop("per_sample"))
    return out
