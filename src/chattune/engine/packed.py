"""A model's linear layers on a CPU through oneDNN's pre-packed float32 linear.

With its weight stored row-major, ``F.linear`` runs MKL's generic GEMM on every call.
oneDNN's linear on a weight reordered once into its blocked layout (what torch.compile's
CPU freezing pass does, ``mkldnn._linear_pointwise``) does the same work faster at the
few rows of a decode step, the vocabulary projection most of all (benchmarks/decode_rows.py
measures both, packed against plain).
transformers and PEFT have no inference-time switch for it, so the engine swaps the
``forward`` of each plain ``nn.Linear`` (and GPT-2's ``Conv1D``, a linear with its weight
stored transposed) for the duration of its own forwards. PEFT's
wrapped layers call their ``base_layer`` (a plain ``nn.Linear``), so LoRA, DoRA, IA3 and
the adapters get the packed base matmul too; their own small matrices stay on ``F.linear``
(below ``MIN_ELEMENTS`` the packed kernel's fixed cost is larger than what it saves).

Only where it is safe: float32 weights on the CPU, no autocast, gradients off, no
accelerate hook, no ``forward`` already swapped by someone else. The packed copies belong
to the ``PackedLinears`` object (the engine's), keyed by each weight's storage and
version counter, so a weight changed in place (training between two evaluations) is
packed again, and the copies are freed with the engine. They cost one more copy of the
packed weights, so packing is skipped when that would take more than half of the memory
the system has available. Outputs differ from ``F.linear``'s by float rounding (~1e-6
relative); the engine uses the same kernels for every row and step, so batched and
sequential answers stay equal.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from transformers.pytorch_utils import Conv1D

MIN_ELEMENTS = 65_536  # weights smaller than this (LoRA's A and B) stay on F.linear


def available_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux-like: no guard to apply
        return None


class PackedLinears:
    """The plain float32 CPU linear modules of ``model`` and their packed weights."""

    def __init__(self, model: torch.nn.Module, exclude: frozenset[int] = frozenset()):
        """``exclude``: ids of modules left on ``F.linear`` (the lean decode step holds
        them packed in fused form, ``engine/lean.py``)."""
        self.modules = [m for m in model.modules() if _packable(m, MIN_ELEMENTS) and id(m) not in exclude]
        self.ids = {id(m) for m in self.modules}
        free = available_bytes()
        if free is not None and 2 * sum(m.weight.nbytes for m in self.modules) > free:
            self.modules = []
        self.cache: dict[int, tuple[tuple, object]] = {}  # id(module) -> (weight key, packed forward)

    def forward_of(self, m: torch.nn.Module):
        """``m``'s packed forward, or None when ``m`` is not packed here."""
        return self._forward(m) if id(m) in self.ids else None

    def _forward(self, m: torch.nn.Module):
        """``m``'s packed forward, packed again when its weight changed since."""
        w = m.weight
        key = (w.data_ptr(), w._version, tuple(w.shape))
        cached = self.cache.get(id(m))
        if cached is None or cached[0] != key:
            w = w.detach().t().contiguous() if isinstance(m, Conv1D) else w.detach()  # as (d_out, d_in)
            cached = (key, _forward(torch.ops.mkldnn._reorder_linear_weight(w, None), m.bias))
            self.cache[id(m)] = cached
        return cached[1]

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """Within the block, the modules run on their packed weights (when safe now)."""
        if not self.modules or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
            yield
            return
        swapped = []
        try:
            for m in self.modules:
                state = m.__dict__  # set and removed directly: nn.Module.__setattr__ costs ~10x more, per layer per step
                if "forward" in state or m.weight.dtype != torch.float32 or m.weight.device.type != "cpu":
                    continue  # swapped by someone else, or moved/cast since
                state["forward"] = self._forward(m)
                swapped.append(state)
            yield
        finally:
            for state in swapped:
                del state["forward"]


def _packable(m: torch.nn.Module, min_elements: int) -> bool:
    w = getattr(m, "weight", None)
    return (type(m) in (torch.nn.Linear, Conv1D) and w is not None and w.device.type == "cpu" and w.dtype == torch.float32
            and w.numel() >= min_elements and not hasattr(m, "_hf_hook") and torch.backends.mkldnn.is_available())


def _forward(weight: torch.Tensor, bias: torch.Tensor | None):
    def forward(x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., d_out)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")

    return forward
