"""Sampling settings and the per-row choice of the next token.

The shipped defaults live here, in one place: ``chattune chat``, ``chattune eval`` (its
headline decoding) and ``chattune serve`` all read ``DEFAULTS``.

Written here rather than with transformers' ``LogitsProcessorList``: those processors take
one setting for the whole batch, while every row of a continuous batch carries its own
temperature, top-p, top-k, repetition penalty and seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from chattune.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """How one answer is decoded. ``temperature == 0`` is greedy (argmax)."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> "SamplingParams":
        """A copy with ``changes`` applied (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


# The shipped decoding: measured to keep SmolLM2 answers from looping (README, "Evaluation").
DEFAULTS = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.1)
# The diagnostic decoding: plain argmax, no penalty.
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019) on the tokens in ``seen`` only.

    ``seen`` (B, V) marks each row's *generated* tokens, EOS excluded: penalising the prompt
    suppresses the end of multi-turn answers (transformers #26902), and penalising EOS
    keeps a model from stopping. ``penalty`` (B, 1); rows with 1.0 are left bit-identical.
    """
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def noise_seed(seed: int, position: int) -> int:
    """The seed of the draw for answer token ``position`` of a request seeded ``seed``."""
    return (seed * 0x9E3779B97F4A7C15 + position) % 2**63  # distinct positions, distinct streams


def choose(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None]) -> list[int]:
    """Next token of every row: argmax for greedy rows, a seeded draw for the others.

    ``logits`` (B, V) float32, already penalised. Order as in transformers: temperature,
    then top-k, then top-p (the smallest set of tokens whose probability reaches top_p).
    ``seeds`` (``noise_seed``, one per sampled row) fix each draw. The draw is Gumbel-max
    (argmax of log-probabilities plus Gumbel noise, an exact sample of the distribution)
    with noise that depends on the request's seed and the token's position only, so a
    token is a function of its row's own history: the same whatever else is in the batch,
    and the same whether the engine decoded it alone or checked it as one of several
    tokens proposed at once (speculative steps, ``engine/lookup.py``).
    """
    out = logits.argmax(-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    x = logits[rows] / torch.tensor([[params[i].temperature] for i in rows], device=logits.device)  # (S, V)
    vocab = x.shape[-1]
    ks = [params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in rows]
    k = max(ks)
    # top-k: one topk of the largest k (cheap) instead of a full sort when every row limits k
    vals, idx = torch.topk(x, k, dim=-1) if k < vocab else torch.sort(x, dim=-1, descending=True)  # (S, k)
    rank = torch.arange(k, device=x.device)
    vals = vals.masked_fill(rank[None, :] >= torch.tensor(ks, device=x.device)[:, None], float("-inf"))
    probs = torch.softmax(vals, -1)
    top_p = torch.tensor([[params[i].top_p] for i in rows], device=x.device)
    drop = (probs.cumsum(-1) - probs) >= top_p  # keeps the first token whatever top_p is
    logp = torch.log_softmax(vals.masked_fill(drop, float("-inf")), -1)  # (S, k), -inf outside the kept set
    generator = torch.Generator(device=x.device)
    for j, i in enumerate(rows):
        generator.manual_seed(seeds[i])
        u = torch.rand(k, generator=generator, device=x.device, dtype=torch.float64).clamp_(min=1e-300)
        gumbel = -torch.log(-torch.log(u)).to(logp.dtype)  # (k,), standard Gumbel
        out[i] = int(idx[j, int((logp[j] + gumbel).argmax())])
    return out
