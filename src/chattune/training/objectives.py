"""Training objectives: the loss over a batch and its logged metrics, plugged into the one loop.

SFT and the preference objectives are peers. Each turns prepared samples into batches
(``collate``), says how many units the loss is averaged over (``units``: loss-bearing
tokens for SFT, pairs for preferences), and computes ``loss(model, batch)`` as a sum over
those units plus the sums of its metrics. The loop in ``chattune.training.loop`` neither knows
nor cares which objective runs, and no objective knows which method runs.

Preference losses, per pair with policy log-probs ``pc``/``pr`` (summed over the chosen
and rejected answer tokens), reference log-probs ``rc``/``rr`` and answer lengths ``lc``/``lr``:

- DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * h)``, ``h = (pc - rc) - (pr - rr)``;
  with ``label_smoothing`` eps the robust DPO of Chowdhury et al. 2024 (eq. 6), unbiased when
  a share eps of the crowd's votes is flipped: ``((1-eps) l(h) - eps l(-h)) / (1 - 2 eps)``.
- IPO (Azar et al. 2023, eq. 17): ``(h' - 1/(2 beta))^2`` with ``h'`` the log-ratio difference
  per answer token (the normalised form the paper's results use, as TRL confirmed with the authors).
- SimPO (Meng et al. 2024, eq. 6): ``-log sigmoid(beta pc/lc - beta pr/lr - gamma)``, no reference.
- ORPO (Hong et al. 2024, eq. 6): ``-pc/lc + alpha * -log sigmoid(log odds(c) - log odds(r))``,
  odds from the per-token mean likelihood, no reference.

``train.sft_weight`` adds ``sft_weight * (-pc/lc)``, an SFT term on the chosen answer.
Log-probs come from ``chattune.training.loss.token_losses`` (the LM head projects only answer
positions; prompt tuning's virtual positions are skipped) and are summed per answer
segment, so a flat packed row of many answers gives each its own sum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from chattune.data import IGNORE_INDEX, collate, prepare
from chattune.data.pairs import prepare_pairs, split_pair
from chattune.evaluate import loss_on_samples
from chattune.training.loss import answer_logits, cross_entropy, shift_targets, token_loss_sum, token_losses
from chattune.training.unlikelihood import answer_runs, unlikelihood_sum

PREFERENCE = ("dpo", "ipo", "simpo", "orpo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}
METRICS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected",
           "length_chosen", "length_rejected")
EXTRA_KEYS = ("segment_ids", "pairs", "ref_logps")  # batch entries the model must not see


class SFT:
    """Next-token cross-entropy on the answer tokens, averaged over all of them; with
    ``unlikelihood_alpha`` > 0, plus that times the token-level unlikelihood term against
    repeating the answer's own earlier tokens (``chattune.training.unlikelihood``)."""

    name = "sft"
    needs_reference = False
    segments = 1  # sequences per sample: a packed row holds max_length * segments tokens
    metrics: tuple[str, ...] = ()

    def __init__(self, unlikelihood_alpha: float = 0.0):
        self.unlikelihood_alpha = unlikelihood_alpha
        if unlikelihood_alpha > 0:
            self.metrics = ("token_ce", "unlikelihood")  # per answer token, logged beside the total

    def prepare(self, data_cfg, tokenizer):
        return prepare(data_cfg, tokenizer)

    def collate(self, samples: list[dict], pad_id: int, **kw) -> dict:
        return collate(samples, pad_id, **kw)

    def units(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model, batch: dict, full_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.unlikelihood_alpha:
            loss, _ = token_loss_sum(model, batch, full_logits=full_logits)
            return loss, torch.zeros(0, dtype=torch.float64)
        targets = shift_targets(batch["labels"])
        keep = targets != IGNORE_INDEX  # (B, T)
        logits = answer_logits(model, batch, keep, full_logits)  # (N, V)
        ce = cross_entropy(logits, targets[keep]).sum()
        ul = unlikelihood_sum(logits, targets[keep], answer_runs(keep))
        return ce + self.unlikelihood_alpha * ul, torch.stack([ce.detach(), ul.detach()]).double().cpu()

    def validate(self, model, samples, pad_id, batch_size, device, dtype=None) -> float:
        return loss_on_samples(model, samples, pad_id, batch_size, device, dtype)["loss"]

    def start(self, trainer) -> None:
        pass


class Preference(SFT):
    """DPO, IPO, SimPO or ORPO over (chosen, rejected) pairs."""

    segments = 2
    metrics = METRICS

    def __init__(self, name: str, beta: float | None = None, label_smoothing: float = 0.0, simpo_gamma: float = 1.0,
                 orpo_alpha: float = 0.1, sft_weight: float = 0.0):
        self.name, self.label_smoothing, self.gamma = name, label_smoothing, simpo_gamma
        self.beta = DEFAULT_BETA[name] if beta is None else beta
        self.alpha, self.sft_weight = orpo_alpha, sft_weight
        self.needs_reference = name in ("dpo", "ipo")

    def prepare(self, data_cfg, tokenizer):
        return prepare_pairs(data_cfg, tokenizer)

    def collate(self, samples: list[dict], pad_id: int, *, packing: bool, bins=None, mask_dtype=torch.float32,
                flat: bool = False) -> dict:
        return collate_pairs(samples, pad_id, packing=packing, bins=bins, mask_dtype=mask_dtype, flat=flat)

    def units(self, batch: dict) -> int:
        return batch["pairs"]

    def loss(self, model, batch: dict, full_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        logps, lengths = pair_logps(model, batch, full_logits)  # (P, 2) each
        losses, rewards = self.pair_losses(logps, batch.get("ref_logps"), lengths)
        margin = (rewards[:, 0] - rewards[:, 1]).detach()
        stats = torch.stack([(margin > 0).float(), margin, rewards[:, 0].detach(), rewards[:, 1].detach(),
                             logps[:, 0].detach(), logps[:, 1].detach(), lengths[:, 0], lengths[:, 1]])  # (8, P)
        return losses.sum(), stats.sum(1).double().cpu()

    def pair_losses(self, logps: torch.Tensor, ref: torch.Tensor | None, lengths: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair losses (P,) and implicit rewards (P, 2) from log-prob sums (P, 2)."""
        mean = logps / lengths  # (P, 2) per-token log-likelihood
        if self.name in ("dpo", "ipo"):
            if ref is None:
                raise RuntimeError(f"{self.name} needs the reference log-probs (Preference.start)")
            ratios = logps - ref.to(logps)  # (P, 2)
            rewards = self.beta * ratios
            if self.name == "dpo":
                losses = robust_sigmoid_loss(self.beta * (ratios[:, 0] - ratios[:, 1]), self.label_smoothing)
            else:
                per_token = ratios / lengths
                losses = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * self.beta)) ** 2
        elif self.name == "simpo":
            rewards = self.beta * mean
            losses = robust_sigmoid_loss(rewards[:, 0] - rewards[:, 1] - self.gamma, self.label_smoothing)
        else:  # orpo: log odds = log p - log(1 - p), p the per-token mean likelihood
            log_odds = mean - torch.log(-torch.expm1(mean.clamp(max=-1e-6)))  # (P, 2)
            losses = -mean[:, 0] - self.alpha * F.logsigmoid(log_odds[:, 0] - log_odds[:, 1])
            rewards = self.beta * mean
        if self.sft_weight:
            losses = losses - self.sft_weight * mean[:, 0]
        return losses, rewards

    @torch.no_grad()
    def validate(self, model, samples, pad_id, batch_size, device, dtype=None) -> float:
        model.eval()
        total = 0.0
        for start in range(0, len(samples), batch_size):
            batch = self.collate(samples[start:start + batch_size], pad_id, packing=False)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                total += float(self.loss(model, batch)[0])
        return total / max(len(samples), 1)

    def start(self, trainer) -> None:
        from chattune.training.reference import attach_reference

        disable_dropout(trainer.model)
        attach_reference(trainer)


def robust_sigmoid_loss(h: torch.Tensor, eps: float) -> torch.Tensor:
    """-log sigmoid(h); with eps > 0 the robust (unbiased under flipped labels) form. ln 2 at h = 0."""
    if not eps:
        return -F.logsigmoid(h)
    return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


def disable_dropout(model: torch.nn.Module) -> None:
    """Chosen and rejected are compared through one margin; dropout noise would move it (and at
    step 0 the policy would no longer equal the reference computed without dropout). TRL does the same."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def collate_pairs(samples: list[dict], pad_id: int, *, packing: bool, bins=None, mask_dtype=torch.float32,
                  flat: bool = False) -> dict:
    """SFT's collation of the pairs' answers as separate conversations, plus ``segment_ids`` (B, T):
    2k for pair k's chosen tokens, 2k + 1 for its rejected ones, -1 for padding."""
    segs = [seg for s in samples for seg in split_pair(s)]
    if packing:
        seg_bins = [[2 * j + k for j in row for k in (0, 1)] for row in bins]
        layout = [[i for row in seg_bins for i in row]] if flat else seg_bins
    else:
        seg_bins, layout = None, [[i] for i in range(len(segs))]
    batch = collate(segs, pad_id, packing=packing, bins=seg_bins, mask_dtype=mask_dtype, flat=flat)
    segment_ids = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)  # (B, T)
    for r, row in enumerate(layout):
        start = 0
        for i in row:
            n = len(segs[i]["input_ids"])
            segment_ids[r, start:start + n] = i
            start += n
    batch["segment_ids"], batch["pairs"] = segment_ids, len(samples)
    if all("ref" in s for s in samples):
        batch["ref_logps"] = torch.tensor([s["ref"] for s in samples], dtype=torch.float32)  # (P, 2)
    return batch


def pair_logps(model, batch: dict, full_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs (P, 2) float32 (chosen, rejected) and answer lengths (P, 2)."""
    inputs = {k: v for k, v in batch.items() if k not in EXTRA_KEYS}
    targets = shift_targets(inputs["labels"])  # (B, T)
    ce, keep = token_losses(model, inputs, targets, full_logits)  # (N,), (B, T)
    # Position t predicts t + 1; a segment's first label is always ignored, so the target of a
    # kept position lies in the position's own segment.
    seg = batch["segment_ids"][keep]  # (N,)
    n = 2 * batch["pairs"]
    zeros = torch.zeros(n, dtype=torch.float32, device=ce.device)
    logps = zeros.index_add(0, seg, -ce.float())
    lengths = zeros.index_add(0, seg, torch.ones_like(ce, dtype=torch.float32))
    return logps.view(-1, 2), lengths.view(-1, 2)


def get_objective(train_args) -> SFT:
    """The objective ``train.objective`` names, with its settings."""
    t = train_args
    if t.objective == "sft":
        return SFT(t.unlikelihood_alpha)
    return Preference(t.objective, t.beta, t.label_smoothing, t.simpo_gamma, t.orpo_alpha, t.sft_weight)


class MetricWindow:
    """Sums of an objective's per-pair metrics between two log lines."""

    def __init__(self, names: tuple[str, ...]):
        self.names, self.sums, self.n = names, torch.zeros(len(names), dtype=torch.float64), 0

    def add(self, sums: torch.Tensor, n: int) -> None:
        self.sums += sums.cpu()
        self.n += n

    def pop(self) -> dict:
        out = {k: float(v) / self.n for k, v in zip(self.names, self.sums)} if self.n else {}
        self.sums.zero_()
        self.n = 0
        return {k: v for k, v in out.items() if math.isfinite(v)}
