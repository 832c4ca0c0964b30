"""The output projection on a CPU through oneDNN's pre-packed float32 linear.

The vocabulary projection is the largest single matmul of a decode step (49,152 x 576 for
SmolLM2: 28 M of its 135 M weights) and runs with few rows (one per sequence). With its
weight stored row-major, ``F.linear`` streams it through a generic GEMM; oneDNN's linear
on a weight reordered once into its blocked layout (what torch.compile's CPU freezing
pass does, ``mkldnn._linear_pointwise``) did the same work in about half the time here
(benchmarks/decode_rows.py). transformers and PEFT have no inference-time switch for it,
so the engine swaps the head's ``forward`` for the duration of its own forwards.

Only where it is safe: a plain ``nn.Linear`` head (not a PEFT-wrapped one, not one with an
accelerate hook) with float32 weights on the CPU, no autocast, gradients off. The packed
copy is keyed by the weight's storage and version counter, so a weight changed in place
(training between two evaluations) is packed again. It costs one more copy of the head.
Logits differ from ``F.linear``'s by float rounding (~1e-6 relative); the engine uses
the same kernel for every row and step, so batched and sequential answers stay equal.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def _usable(head) -> bool:
    w = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and "forward" not in head.__dict__ and w is not None
            and w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def _packed(head: torch.nn.Linear) -> torch.Tensor:
    w = head.weight
    key = (w.data_ptr(), w._version, tuple(w.shape))
    cached = head.__dict__.get("_chattune_packed")
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), None))
        head.__dict__["_chattune_packed"] = cached
    return cached[1]


@contextlib.contextmanager
def packed_head(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s output projection runs on its packed weight (when usable)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not _usable(head):
        yield
        return
    weight, bias = _packed(head), head.bias

    def forward(x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., V)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")

    head.forward = forward
    try:
        yield
    finally:
        del head.forward
