"""``chattune eval`` of a preference run: how often held-out pairs are ranked like the votes.

Three rankings of the same held-out pairs, each as an accuracy with a 95% bootstrap
interval (1000 resamples of the pairs; a tie counts half):

- ``implicit_reward``: the tuned model's own reward margin (for DPO/IPO its log-ratio to
  the reference, for SimPO/ORPO its per-token likelihood), i.e. what training optimised;
- ``reference_likelihood``: the starting policy's summed log-likelihood of each answer
  (stored with the run, ``chattune.training.reference``): the ranking before any preference training;
- ``longer_answer``: the longer answer wins, the bias any preference data set invites.

Tie pairs (DPO with ``train.ties``) are scored by training, not ranked here: a tie has no
right order. A KTO run ranks the same decided votes by its own implicit reward
beta * (log pi - log pi_ref) of each answer, so its accuracy sits beside DPO's on the same
pairs, and adds ``desirable_vs_undesirable``: the chance that a held-out desirable answer
(winners, ties, thumbs up) outranks an undesirable one (losers, "both bad", thumbs down), a
tie counting half (AUC), with a bootstrap interval over the answers.

Plus the generation metrics of ``chattune.evaluate`` for the tuned and the base model on
the held-out prompts (with the chosen answer as reference), to see answer length and the
stop rate move.
"""

from __future__ import annotations

import torch

from chattune.data.votes import prepare_kto
from chattune.errors import UserError
from chattune.training.objectives import get_objective
from chattune.training.passes import passes
from chattune.training.reference import load_reference

RESAMPLES = 1000


def bootstrap_accuracy(wins: torch.Tensor, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Mean of ``wins`` (n,) in [0, 1] and its 95% percentile bootstrap interval."""
    g = torch.Generator().manual_seed(seed)
    means = wins[torch.randint(len(wins), (resamples, len(wins)), generator=g)].mean(1)  # (resamples,)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return {"accuracy": float(wins.mean()), "low": low, "high": high}


def wins_of(margin: torch.Tensor) -> torch.Tensor:
    return (margin > 0).double() + 0.5 * (margin == 0).double()


def policy_logps(model, objective, samples, pad_id, batch_size, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    batches = (objective.collate(samples[start:start + batch_size], pad_id, packing=False)
               for start in range(0, len(samples), batch_size))
    logps, lengths = zip(*((lp.cpu(), n.cpu()) for lp, n in passes(model, batches, device, dtype, objective.logps)))
    return torch.cat(logps), torch.cat(lengths)  # (n, 2) each


def pair_accuracies(run, split: str, max_samples: int | None, device, dtype) -> tuple[dict, list[dict]]:
    """The three rankings' accuracies on ``split``, and the held-out pairs (for generation)."""
    cfg, objective = run.cfg, get_objective(run.cfg.train)
    # the samples, in the order the stored reference has them
    data = prepare_kto(cfg.data, run.tokenizer) if objective.name == "kto" else objective.prepare(cfg.data, run.tokenizer)
    if split not in data.splits:
        raise UserError(f"unknown split '{split}': choose train, validation or test")
    samples = data.splits[split]
    if not samples:
        raise UserError(f"the {split} split holds no pairs")
    stored = (load_reference(run.run_dir) or {}).get(split)
    if stored is not None and stored.shape[0] != len(samples):
        raise UserError(f"{run.run_dir}: the stored reference log-probs do not match the {split} pairs of its data")
    n = min(len(samples), max_samples or cfg.eval.max_samples or len(samples))
    logps, lengths = policy_logps(run.model, objective, samples[:n], run.tokenizer.pad_token_id,
                                  cfg.eval.batch_size, device, dtype)
    ref = None if stored is None else stored[:n]
    if ref is None and objective.needs_reference:
        raise UserError(f"{run.run_dir} has no reference log-probs for the {split} split")
    if objective.name == "kto":
        return kto_accuracies(objective, samples[:n], logps, lengths, ref), kto_held_out(data, split)
    decided = torch.tensor([not s.get("tie") for s in samples[:n]])  # (n,)
    logps, lengths, ref = logps[decided], lengths[decided], None if ref is None else ref[decided]
    if not len(logps):
        raise UserError(f"the first {n} pairs of the {split} split are all ties: nothing to rank")
    _, rewards = objective.pair_losses(logps, ref, lengths)
    out = {"n": len(logps), "objective": objective.name,
           "implicit_reward": bootstrap_accuracy(wins_of(rewards[:, 0] - rewards[:, 1]).double()),
           "longer_answer": bootstrap_accuracy(wins_of(lengths[:, 0] - lengths[:, 1]).double())}
    if ref is not None:  # a SimPO/ORPO run stores the starting policy's log-probs for held-out splits only
        out["reference_likelihood"] = bootstrap_accuracy(wins_of(ref[:, 0] - ref[:, 1]).double())
    held_out = [p for p in data.conversations.samples if p["split"] == split]
    return out, held_out


def kto_accuracies(objective, samples: list[dict], logps: torch.Tensor, lengths: torch.Tensor,
                   ref: torch.Tensor) -> dict:
    """A KTO run's rankings: decided votes as pairs (winner's answer vs loser's), and all
    desirable against all undesirable answers."""
    reward = objective.rewards(logps, ref)  # (n,)
    sides: dict[str, dict[bool, int]] = {}
    for i, s in enumerate(samples):
        if s["vote"] == "decided":
            sides.setdefault(s["id"].rsplit(":", 1)[0], {})[bool(s["label"])] = i
    pairs = torch.tensor([[v[True], v[False]] for v in sides.values() if len(v) == 2], dtype=torch.long)  # (m, 2)
    desirable = torch.tensor([bool(s["label"]) for s in samples])
    out = {"n": len(samples), "objective": objective.name, "pairs": len(pairs),
           "desirable_vs_undesirable": bootstrap_auc(reward[desirable].double(), reward[~desirable].double())}
    if len(pairs):
        out["implicit_reward"] = bootstrap_accuracy(wins_of(reward[pairs[:, 0]] - reward[pairs[:, 1]]).double())
        out["longer_answer"] = bootstrap_accuracy(wins_of(lengths[pairs[:, 0], 0] - lengths[pairs[:, 1], 0]).double())
        out["reference_likelihood"] = bootstrap_accuracy(wins_of(ref[pairs[:, 0], 0] - ref[pairs[:, 1], 0]).double())
    return out


def bootstrap_auc(good: torch.Tensor, bad: torch.Tensor, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """P(a good score > a bad one), ties half, and its 95% bootstrap interval (answers resampled)."""
    if not len(good) or not len(bad):
        return {"accuracy": None, "low": None, "high": None}
    wins = wins_of(good[:, None] - bad[None, :])  # (G, B)
    g = torch.Generator().manual_seed(seed)
    wg = torch.zeros(resamples, len(good), dtype=wins.dtype).scatter_add_(
        1, torch.randint(len(good), (resamples, len(good)), generator=g), torch.ones(resamples, len(good), dtype=wins.dtype))
    wb = torch.zeros(resamples, len(bad), dtype=wins.dtype).scatter_add_(
        1, torch.randint(len(bad), (resamples, len(bad)), generator=g), torch.ones(resamples, len(bad), dtype=wins.dtype))
    aucs = ((wg @ wins) * wb).sum(1) / (len(good) * len(bad))  # (resamples,)
    low, high = torch.quantile(aucs, torch.tensor([0.025, 0.975], dtype=aucs.dtype)).tolist()
    return {"accuracy": float(wins.mean()), "low": low, "high": high}


def kto_held_out(data, split: str) -> list[dict]:
    """One held-out prompt per vote for generation, its desirable answer as the reference."""
    seen, out = set(), []
    for ex in data.conversations.samples:
        key = ex["id"].rsplit(":", 1)[0]
        if ex["split"] == split and ex["label"] and key not in seen:
            seen.add(key)
            out.append({"id": key, "chosen": ex["messages"]})
    return out
