"""Evaluation: answer-token and all-token loss/perplexity, and generation metrics,
for the tuned model and the base model in one command.

The base numbers come from the same loaded model with the method switched off
(``Method.disable``), never from a second model the adapter was injected into: that was
the seed notebook's mistake (``PeftModel.from_pretrained`` modifies its base in place).
ROUGE-L, distinct-n and repeated-n-gram rates are a few lines each, so they are written
here rather than pulling in ``rouge-score`` and its NLTK dependency.
"""

from __future__ import annotations

import math

import torch

from chattune.data import IGNORE_INDEX, collate
from chattune.errors import UserError
from chattune.loss import shift_targets, token_losses
from chattune.textstats import repeated_ngram_rate


@torch.no_grad()
def loss_on_samples(model, samples: list[dict], pad_id: int, batch_size: int, device, dtype=None) -> dict:
    """Mean CE and perplexity over answer tokens (``loss``) and over all tokens (``all_loss``)."""
    model.eval()
    sums = {"loss": 0.0, "n": 0, "all_loss": 0.0, "all_n": 0}
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))  # less padding
    for start in range(0, len(order), batch_size):
        batch = collate([samples[i] for i in order[start:start + batch_size]], pad_id, packing=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        # all-token targets: every real token but the first, as the seed measured (prompt included)
        ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        ids[:, 0] = IGNORE_INDEX
        # one forward for both: answer positions are a subset of the all-token positions
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses, keep = token_losses(model, batch, shift_targets(ids))  # (N,), (B, T)
        answer = (shift_targets(batch["labels"]) != IGNORE_INDEX)[keep]  # (N,)
        sums["loss"] += float(losses[answer].sum())
        sums["n"] += int(answer.sum())
        sums["all_loss"] += float(losses.sum())
        sums["all_n"] += int(keep.sum())
    out = {"loss": sums["loss"] / max(sums["n"], 1), "all_loss": sums["all_loss"] / max(sums["all_n"], 1),
           "loss_tokens": sums["n"], "all_tokens": sums["all_n"]}
    out["ppl"] = math.exp(min(out["loss"], 50))
    out["all_ppl"] = math.exp(min(out["all_loss"], 50))
    return out


# -- text metrics ------------------------------------------------------------------------
def distinct_n(answers: list[list], n: int = 2) -> float:
    """Corpus-level distinct-n (Li et al. 2016): unique n-grams / all n-grams."""
    grams = [tuple(a[i:i + n]) for a in answers for i in range(len(a) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (Lin 2004)."""
    c, r = candidate.lower().split(), reference.lower().split()
    if not c or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for x in c:  # LCS by dynamic programming, one row at a time
        cur = [0]
        for j, y in enumerate(r):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def eval_prompts(conversations: list[dict], n: int) -> list[dict]:
    """First user turn and its reference answer of the first ``n`` held-out conversations."""
    out = []
    for conv in conversations[:n]:
        msgs = conv["messages"]
        out.append({"id": conv["id"], "prompt": msgs[0]["content"], "reference": msgs[1]["content"]})
    return out


def generation_metrics(answers: list, prompts: list[dict]) -> dict:
    """Metrics of engine answers to ``prompts`` (EOS rate, loops, diversity, ROUGE-L)."""
    token_lists = [a.token_ids for a in answers]
    metrics = {
        "eos_rate": sum(a.stopped for a in answers) / max(len(answers), 1),
        "repeat_4gram": sum(repeated_ngram_rate(t) for t in token_lists) / max(len(answers), 1),
        "distinct_2": distinct_n(token_lists, 2),
        "mean_length": sum(len(t) for t in token_lists) / max(len(answers), 1),
        "rouge_l": sum(rouge_l(a.text, p["reference"]) for a, p in zip(answers, prompts)) / max(len(answers), 1),
    }
    samples = [{"prompt": p["prompt"], "answer": a.text.strip(), "stopped": a.stopped} for p, a in zip(prompts, answers)]
    return {"metrics": metrics, "samples": samples}


def evaluate_run(run, split: str = "test", *, max_samples: int | None = None, num_generate: int | None = None,
                 max_new_tokens: int | None = None, include_base: bool = True) -> dict:
    """Tuned and base numbers for one split of a loaded run (``generate.LoadedRun``)."""
    from chattune.data import prepare
    from chattune.models import autocast_dtype

    cfg = run.cfg
    data = prepare(cfg.data, run.tokenizer)
    if split not in data.splits:
        raise UserError(f"unknown split '{split}': choose train, validation or test")
    samples = data.splits[split][: max_samples or cfg.eval.max_samples or None]
    if not samples:
        raise UserError(f"the {split} split is empty")
    held_out = [c for c in data.conversations.samples if c["split"] == split]
    prompts = eval_prompts(held_out, cfg.eval.num_generate if num_generate is None else num_generate)
    device = next(run.model.parameters()).device
    dtype = autocast_dtype(cfg.train.precision, device)
    from chattune.engine import GREEDY

    budget = max_new_tokens or cfg.eval.max_new_tokens
    variants = ["tuned", "base"] if include_base else ["tuned"]
    requests = [run.request([{"role": "user", "content": p["prompt"]}], max_new_tokens=budget, sampling=GREEDY,
                            variant=v, tag=(v, i)) for v in variants for i, p in enumerate(prompts)]
    answers = run.engine(base=include_base).run(requests)  # tuned and base rows share the batches
    by_variant = {v: [a for a in answers if a.tag[0] == v] for v in variants}

    def model_result(model, variant):
        out = loss_on_samples(model, samples, run.tokenizer.pad_token_id, cfg.eval.batch_size, device, dtype)
        if prompts:
            gen = generation_metrics(by_variant[variant], prompts)
            out.update(gen["metrics"])
            out["samples"] = gen["samples"]
        return out

    result = {"split": split, "samples": len(samples), "method": cfg.method.name,
              "tuned": model_result(run.model, "tuned")}
    if include_base:
        with run.base() as base:
            result["base"] = model_result(base, "base")
    return result
