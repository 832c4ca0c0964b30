"""Tie-aware DPO: the likelihood of a tie under the Rao-Kupper and Davidson extensions of
Bradley-Terry (Chen et al. 2024, "On Extending Direct Preference Optimization to
Accommodate Ties"), so a ``tie`` vote teaches that two answers are about equally good.

With ``d = beta * ((pA - rA) - (pB - rB))``, the DPO margin of answer A over answer B:

- Rao-Kupper (nu >= 1, alpha = log nu): P(A > B) = sigmoid(d - alpha),
  P(tie) = (nu^2 - 1) sigmoid(d - alpha) sigmoid(-d - alpha);
- Davidson (nu >= 0): P(A > B) = e^{d/2} / Z, P(tie) = nu / Z, Z = e^{d/2} + e^{-d/2} + nu.

The loss is -log P(A > B) on a decided pair (A the chosen answer) and -log P(tie) on a tie
pair. At nu = 1 (Rao-Kupper) or nu = 0 (Davidson) P(A > B) = sigmoid(d): plain DPO. Both
tie losses are even in d and convex, so least at d = 0. At d = 0, P(tie) is (nu - 1) /
(nu + 1) (Rao-Kupper) or nu / (nu + 2) (Davidson); the defaults below set it to 0.2, about
the share of ties among the arena's decided and tied votes (11 of 53 in the built-in sample;
about a fifth on the hub's 33,000 battles, where ``tie`` and ``tie (bothbad)`` are a third).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TIE_SHARE = 0.2
DEFAULT_NU = {"rao-kupper": (1 + TIE_SHARE) / (1 - TIE_SHARE), "davidson": 2 * TIE_SHARE / (1 - TIE_SHARE)}
NO_TIE_NU = {"rao-kupper": 1.0, "davidson": 0.0}  # the nu at which the model is Bradley-Terry (DPO)


def tie_losses(d: torch.Tensor, tie: torch.Tensor, model: str, nu: float) -> torch.Tensor:
    """-log P(A > B) where ``tie`` is False, -log P(tie) where it is True; ``d`` (P,), ``tie`` (P,) bool."""
    if model == "rao-kupper":
        alpha = math.log(nu)
        win = F.softplus(alpha - d)  # -log sigmoid(d - alpha)
        if not bool(tie.any()):
            return win
        return torch.where(tie, win + F.softplus(alpha + d) - math.log(nu * nu - 1), win)
    if model == "davidson":
        log_nu = torch.full_like(d, math.log(nu) if nu > 0 else -math.inf)
        log_z = torch.logsumexp(torch.stack([d / 2, -d / 2, log_nu]), dim=0)  # (P,)
        return torch.where(tie, log_z - log_nu, log_z - d / 2)
    raise ValueError(f"unknown tie model {model!r}")
