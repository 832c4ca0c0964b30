"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"):
a loss over single answers marked desirable or undesirable, so votes without a winner
teach too (``chattune.data.votes``: a ``tie (bothbad)`` gives two undesirable answers).

Per answer y to prompt x, with r = log pi(y|x) - log pi_ref(y|x) (summed over the answer's
tokens) and the reference point z0 (the paper's eq. 8, TRL's ``KTOTrainer``):

    z0 = max(0, mean_j [log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)])    no gradient through z0
    loss = lambda_D (1 - sigmoid(beta (r - z0)))    y desirable
    loss = lambda_U (1 - sigmoid(beta (z0 - r)))    y undesirable

averaged over the batch's answers. z0 estimates KL(pi || pi_ref) from mismatched pairs:
each example's second segment is its prompt with another prompt's answer
(``chattune.data.votes``), scored by the policy here and by the stored reference pass; the
mean runs over the micro-batch (TRL gathers it across processes; here each process
estimates its own). At the reference (step 0) r = z0 = 0 and every answer's loss is
lambda / 2.

The paper's balance rule: lambda_D n_D / (lambda_U n_U) in [1, 4/3]; a run outside it
prints a warning with the weights that would meet it. The objective itself (``KTO``) is
registered in ``chattune.training.objectives`` beside the others.
"""

from __future__ import annotations

import torch

BALANCE = (1.0, 4 / 3)


def kto_losses(logps: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, beta: float,
               desirable_weight: float, undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-answer losses (P,), log-ratios r (P,) and z0 (a 0-d tensor, no gradient).

    ``logps``/``ref``: (P, 2) summed log-probs of (own answer, mismatched answer);
    ``desirable``: (P,) bool."""
    ratios = logps - ref  # (P, 2)
    z0 = ratios[:, 1].mean().clamp(min=0).detach()
    r = ratios[:, 0]
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses, r, z0


def balance_warning(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
                    ) -> str | None:
    """The paper's rule lambda_D n_D / (lambda_U n_U) in [1, 4/3], worded when broken."""
    if not n_desirable or not n_undesirable:
        return (f"kto: the training split has {n_desirable} desirable and {n_undesirable} undesirable answers; "
                "KTO learns from both kinds")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if BALANCE[0] <= ratio <= BALANCE[1]:
        return None
    fit = undesirable_weight * n_undesirable / n_desirable  # lambda_D at ratio 1
    return (f"kto: lambda_D n_D / (lambda_U n_U) = {desirable_weight:g}*{n_desirable} / "
            f"({undesirable_weight:g}*{n_undesirable}) = {ratio:.2f}, outside the paper's [1, 4/3]; e.g. "
            f"train.kto_desirable_weight={fit:.3g} to {4 / 3 * fit:.3g} meets it")
