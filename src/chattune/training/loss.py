"""Next-token loss computed only where it counts.

HF models return logits for every position: (B, T, V) floats, most of them for prompt
and padding positions whose labels are IGNORE_INDEX. With a 49k vocabulary that tensor
dominates activation memory. ``selected_logits`` puts a forward pre-hook on the LM head
so it projects only the hidden states whose next token carries a loss: (N, C) -> (N, V).
It works unchanged for every method, PEFT wrappers included: prompt tuning's virtual
tokens are recognised as extra leading positions and skipped.

``cross_entropy`` is written here because torch's, given bfloat16 logits, either computes
the log-softmax in bfloat16 or needs a float32 copy of the (N, V) logits, a float32
log-softmax kept for backward, a zero-filled (N, V) gradient and a cast back
(benchmarks/step_kernels.py measures both). It reads the logits in row
chunks, in float32, keeps only their log-sum-exp, and writes the gradient
``softmax - onehot`` directly in the logits' dtype: the same float32 arithmetic, fewer passes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from chattune.data import IGNORE_INDEX


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets: position t predicts token t+1; the last predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "get_output_embeddings") else model


@contextlib.contextmanager
def selected_logits(model, keep: torch.Tensor):
    """Within the block, the model's ``logits`` are (N, V) for the N True positions of ``keep`` (B, T)."""

    def pre_hook(module, args):
        hidden = args[0]  # (B, T + virtual, C)
        mask = keep
        extra = hidden.shape[1] - mask.shape[1]  # prompt tuning prepends virtual tokens
        if extra > 0:
            mask = F.pad(mask, (extra, 0), value=False)
        return (hidden[mask],)  # (N, C)

    handle = unwrap(model).get_output_embeddings().register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


class _CrossEntropy(torch.autograd.Function):
    CHUNK = 64  # rows per pass: 64 x 49k float32 is 12.6 MB, cache-sized

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
        for a in range(0, logits.shape[0], _CrossEntropy.CHUNK):
            lse[a:a + _CrossEntropy.CHUNK] = torch.logsumexp(logits[a:a + _CrossEntropy.CHUNK].float(), dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return lse - logits.gather(1, targets[:, None])[:, 0].float()  # (N,)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)  # (N, V)
        for a in range(0, logits.shape[0], _CrossEntropy.CHUNK):
            b = min(a + _CrossEntropy.CHUNK, logits.shape[0])
            # softmax (n, V) in a float32 copy (copy=True: never in place on float32 logits)
            p = logits[a:b].to(torch.float32, copy=True).sub_(lse[a:b, None]).exp_()
            p[torch.arange(b - a, device=p.device), targets[a:b]] -= 1
            out[a:b] = p.mul_(grad[a:b, None].float())
        return out, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy (N,) float32 of (N, V) logits against (N,) valid targets."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32)
    return _CrossEntropy.apply(logits, targets)


def answer_logits(model, batch: dict, keep: torch.Tensor, full_logits: bool = False) -> torch.Tensor:
    """(N, V) logits at the True positions of ``keep`` (B, T). ``full_logits`` projects every
    position first, as HF models do by default (to measure the cost)."""
    if full_logits:
        logits = model(**model_inputs(batch), use_cache=False).logits  # (B, T + virtual, V)
        return logits[:, logits.shape[1] - keep.shape[1]:][keep]  # (N, V)
    with selected_logits(model, keep):
        return model(**model_inputs(batch), use_cache=False).logits  # (N, V)


def token_losses(model, batch: dict, targets: torch.Tensor, full_logits: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (N,) at the positions of ``keep = targets != IGNORE_INDEX`` (B, T)."""
    keep = targets != IGNORE_INDEX  # (B, T)
    return cross_entropy(answer_logits(model, batch, keep, full_logits), targets[keep]), keep


def token_loss_sum(model, batch: dict, targets: torch.Tensor | None = None, full_logits: bool = False
                   ) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over loss-bearing positions (the shifted labels by default) and their count."""
    targets = shift_targets(batch["labels"]) if targets is None else targets
    losses, keep = token_losses(model, batch, targets, full_logits)
    return losses.sum(), int(keep.sum())
