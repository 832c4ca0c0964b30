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
  a share eps of the crowd's votes is flipped: ``((1-eps) l(h) - eps l(-h)) / (1 - 2 eps)``;
  with ``ties`` a tie model's -log P(win) and, on tie pairs, -log P(tie) of ``beta * h``
  (``chattune.training.ties``).
- IPO (Azar et al. 2023, eq. 17): ``(h' - 1/(2 beta))^2`` with ``h'`` the log-ratio difference
  per answer token (the normalised form the paper's results use, as TRL confirmed with the authors).
- SimPO (Meng et al. 2024, eq. 6): ``-log sigmoid(beta pc/lc - beta pr/lr - gamma)``, no reference.
- ORPO (Hong et al. 2024, eq. 6): ``-pc/lc + alpha * -log sigmoid(log odds(c) - log odds(r))``,
  odds from the per-token mean likelihood, no reference.

KTO scores single desirable/undesirable answers (``chattune.training.kto``, its loss).
``train.sft_weight`` adds ``sft_weight * (-pc/lc)``, an SFT term on the chosen answer.
Log-probs come from ``chattune.training.loss.token_losses`` (the LM head projects only answer
positions; prompt tuning's virtual positions are skipped) and are summed per answer
segment, so a flat packed row of many answers gives each its own sum.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from chattune.data import IGNORE_INDEX, collate, prepare
from chattune.data.pairs import prepare_pairs, split_pair
from chattune.training.loss import answer_logits, cross_entropy, shift_targets, token_loss_sum
from chattune.data.votes import prepare_kto
from chattune.training.kto import balance_warning, kto_losses
from chattune.training.passes import loss_on_samples, pair_logps, passes, segment_logps
from chattune.training.ties import DEFAULT_NU, tie_losses
from chattune.training.unlikelihood import answer_runs, unlikelihood_sum

OBJECTIVES: dict[str, type[SFT]] = {}  # train.objective -> its class, filled by @register
METRICS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected",
           "length_chosen", "length_rejected")


def register(cls):
    OBJECTIVES[cls.name] = cls
    return cls


@register
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

    @classmethod
    def from_settings(cls, t) -> SFT:
        return cls(t.unlikelihood_alpha)

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

    def start(self, model, attach_reference) -> None:
        """Called once before the first step with the (unwrapped) model and a function that gives
        every pair its reference log-probs; SFT needs neither."""


class Preference(SFT):
    """A loss over (chosen, rejected) pairs; each objective below says how in ``losses``."""

    segments = 2
    metrics = METRICS
    default_beta = 0.1

    def __init__(self, beta: float | None = None, label_smoothing: float = 0.0, simpo_gamma: float = 1.0,
                 orpo_alpha: float = 0.1, sft_weight: float = 0.0):
        self.label_smoothing, self.gamma = label_smoothing, simpo_gamma
        self.beta = self.default_beta if beta is None else beta
        self.alpha, self.sft_weight = orpo_alpha, sft_weight

    @classmethod
    def from_settings(cls, t) -> Preference:
        return cls(t.beta, t.label_smoothing, t.simpo_gamma, t.orpo_alpha, t.sft_weight)

    def prepare(self, data_cfg, tokenizer):
        return prepare_pairs(data_cfg, tokenizer)

    def collate(self, samples: list[dict], pad_id: int, *, packing: bool, bins=None, mask_dtype=torch.float32,
                flat: bool = False) -> dict:
        return collate_pairs(samples, pad_id, packing=packing, bins=bins, mask_dtype=mask_dtype, flat=flat)

    def units(self, batch: dict) -> int:
        return batch["pairs"]

    def logps(self, model, batch: dict, full_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed answer log-probs (P, 2) and answer lengths (P, 2) of the batch's pairs: the
        training loss, the reference pass and the eval's rankings all take them from here."""
        return pair_logps(model, batch, full_logits)

    def loss(self, model, batch: dict, full_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        logps, lengths = self.logps(model, batch, full_logits)  # (P, 2) each
        losses, rewards = self.pair_losses(logps, batch.get("ref_logps"), lengths, batch.get("ties"))
        margin = (rewards[:, 0] - rewards[:, 1]).detach()
        stats = torch.stack([(margin > 0).float(), margin, rewards[:, 0].detach(), rewards[:, 1].detach(),
                             logps[:, 0].detach(), logps[:, 1].detach(), lengths[:, 0], lengths[:, 1]])  # (8, P)
        return losses.sum(), stats.sum(1).double().cpu()

    def pair_losses(self, logps: torch.Tensor, ref: torch.Tensor | None, lengths: torch.Tensor,
                    ties: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair losses (P,) and implicit rewards (P, 2) from log-prob sums (P, 2); ``ties``
        (P,) bool marks tie pairs (only DPO with a tie model has them)."""
        if self.needs_reference and ref is None:
            raise RuntimeError(f"{self.name} needs the reference log-probs (Preference.start)")
        mean = logps / lengths  # (P, 2) per-token log-likelihood
        extra = {} if ties is None else {"ties": ties.to(logps.device)}
        losses, rewards = self.losses(logps, None if ref is None else ref.to(logps), lengths, mean, **extra)
        if self.sft_weight:
            losses = losses - self.sft_weight * mean[:, 0]
        return losses, rewards

    def losses(self, logps, ref, lengths, mean) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # each registered preference objective defines its loss

    def validate(self, model, samples, pad_id, batch_size, device, dtype=None) -> float:
        batches = (self.collate(samples[start:start + batch_size], pad_id, packing=False)
                   for start in range(0, len(samples), batch_size))
        total = sum(float(loss) for loss, _ in passes(model, batches, device, dtype, self.loss))
        return total / max(len(samples), 1)

    def start(self, model, attach_reference) -> None:
        disable_dropout(model)
        attach_reference()


@register
class DPO(Preference):
    name, needs_reference = "dpo", True

    def __init__(self, beta: float | None = None, label_smoothing: float = 0.0, sft_weight: float = 0.0,
                 ties: str = "drop", tie_nu: float | None = None):
        super().__init__(beta, label_smoothing, sft_weight=sft_weight)
        self.ties = ties
        self.tie_nu = DEFAULT_NU.get(ties) if tie_nu is None else tie_nu

    @classmethod
    def from_settings(cls, t) -> DPO:
        return cls(t.beta, t.label_smoothing, t.sft_weight, t.ties, t.tie_nu)

    def prepare(self, data_cfg, tokenizer):
        return prepare_pairs(data_cfg, tokenizer, ties=self.ties != "drop")

    def losses(self, logps, ref, lengths, mean, ties=None):
        ratios = logps - ref  # (P, 2)
        d = self.beta * (ratios[:, 0] - ratios[:, 1])  # (P,)
        if self.ties == "drop":
            return robust_sigmoid_loss(d, self.label_smoothing), self.beta * ratios
        tie = torch.zeros_like(d, dtype=torch.bool) if ties is None else ties
        return tie_losses(d, tie, self.ties, self.tie_nu), self.beta * ratios


@register
class IPO(Preference):
    name, needs_reference = "ipo", True

    def losses(self, logps, ref, lengths, mean):
        ratios = logps - ref  # (P, 2)
        per_token = ratios / lengths
        return (per_token[:, 0] - per_token[:, 1] - 1 / (2 * self.beta)) ** 2, self.beta * ratios


@register
class SimPO(Preference):
    name, default_beta = "simpo", 2.0

    def losses(self, logps, ref, lengths, mean):
        rewards = self.beta * mean
        return robust_sigmoid_loss(rewards[:, 0] - rewards[:, 1] - self.gamma, self.label_smoothing), rewards


@register
class ORPO(Preference):
    name = "orpo"

    def losses(self, logps, ref, lengths, mean):
        # log odds = log p - log(1 - p), p the per-token mean likelihood
        log_odds = mean - torch.log(-torch.expm1(mean.clamp(max=-1e-6)))  # (P, 2)
        return -mean[:, 0] - self.alpha * F.logsigmoid(log_odds[:, 0] - log_odds[:, 1]), self.beta * mean


@register
class KTO(Preference):
    """Desirable and undesirable single answers against the stored reference (see module)."""

    name, needs_reference = "kto", True
    metrics = ("kl", "reward_accuracy", "reward_margin", "logp", "length")

    def __init__(self, beta: float | None = None, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        super().__init__(beta)
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    @classmethod
    def from_settings(cls, t) -> KTO:
        return cls(t.beta, t.kto_desirable_weight, t.kto_undesirable_weight)

    def prepare(self, data_cfg, tokenizer):
        data = prepare_kto(data_cfg, tokenizer)
        labels = [s["label"] for s in data.splits["train"]]
        warning = balance_warning(sum(labels), len(labels) - sum(labels), self.desirable_weight,
                                  self.undesirable_weight)
        if warning:
            print(f"chattune: warning: {warning}", file=sys.stderr, flush=True)
        return data

    def collate(self, samples: list[dict], pad_id: int, *, packing: bool, bins=None, mask_dtype=torch.float32,
                flat: bool = False) -> dict:
        """The own answers as one batch (``segment_ids`` k for example k) and the mismatched ones
        as another under ``"mismatched"``, row for row in the same layout: z0 takes no gradient,
        so its answers are scored in a forward of their own without one (``logps``)."""
        sides = [[split_pair(s)[k] for s in samples] for k in (0, 1)]
        own, mismatched = (collate_segments(segs, pad_id, packing=packing, bins=bins, mask_dtype=mask_dtype, flat=flat)
                           for segs in sides)
        own.update(mismatched=mismatched, pairs=len(samples),
                   desirable=torch.tensor([bool(s["label"]) for s in samples]))  # (P,)
        return with_reference(own, samples)

    def logps(self, model, batch: dict, full_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(own, mismatched) log-prob sums and lengths (P, 2): the own answers in the current
        grad mode, the mismatched ones (z0's) under ``no_grad``, so training keeps no
        activations for them (TRL's ``KTOTrainer`` scores its KL rows the same way)."""
        n = batch["pairs"]
        own, own_len = segment_logps(model, batch, n, full_logits)
        with torch.no_grad():
            mis, mis_len = segment_logps(model, batch["mismatched"], n, full_logits)
        return torch.stack([own, mis], 1), torch.stack([own_len, mis_len], 1)

    def loss(self, model, batch: dict, full_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        logps, lengths = self.logps(model, batch, full_logits)  # (P, 2) each
        if batch.get("ref_logps") is None:
            raise RuntimeError("kto needs the reference log-probs (Preference.start)")
        desirable = batch["desirable"].to(logps.device)
        losses, r, z0 = kto_losses(logps, batch["ref_logps"].to(logps), desirable, self.beta,
                                   self.desirable_weight, self.undesirable_weight)
        sign = desirable.float() * 2 - 1  # (P,) +1 desirable, -1 undesirable
        margin = (sign * self.beta * (r - z0)).detach()  # > 0: the answer sits on its label's side of z0
        stats = torch.stack([z0.expand_as(r), (margin > 0).float(), margin, logps[:, 0].detach(), lengths[:, 0]])
        return losses.sum(), stats.sum(1).double().cpu()

    def rewards(self, logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """The implicit reward beta * r of each own answer (P,), as the eval ranks them."""
        return self.beta * (logps[:, 0] - ref[:, 0])


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
    seg_bins = [[2 * j + k for j in row for k in (0, 1)] for row in bins] if packing else None
    batch = collate_segments(segs, pad_id, packing=packing, bins=seg_bins, mask_dtype=mask_dtype, flat=flat)
    batch["pairs"] = len(samples)
    if any(s.get("tie") for s in samples):
        batch["ties"] = torch.tensor([bool(s.get("tie")) for s in samples])  # (P,)
    return with_reference(batch, samples)


def collate_segments(segs: list[dict], pad_id: int, *, packing: bool, bins=None, mask_dtype=torch.float32,
                     flat: bool = False) -> dict:
    """``collate`` of ``segs`` plus ``segment_ids`` (B, T): each token's index in ``segs``, -1 for padding."""
    if packing:
        layout = [[i for row in bins for i in row]] if flat else bins
    else:
        bins, layout = None, [[i] for i in range(len(segs))]
    batch = collate(segs, pad_id, packing=packing, bins=bins, mask_dtype=mask_dtype, flat=flat)
    segment_ids = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)  # (B, T)
    for r, row in enumerate(layout):
        start = 0
        for i in row:
            n = len(segs[i]["input_ids"])
            segment_ids[r, start:start + n] = i
            start += n
    batch["segment_ids"] = segment_ids
    return batch


def with_reference(batch: dict, samples: list[dict]) -> dict:
    if all("ref" in s for s in samples):
        batch["ref_logps"] = torch.tensor([s["ref"] for s in samples], dtype=torch.float32)  # (P, 2)
    return batch


def get_objective(train_args) -> SFT:
    """The objective ``train.objective`` names, with its settings."""
    return OBJECTIVES[train_args.objective].from_settings(train_args)


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

