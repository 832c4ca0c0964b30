"""What every fine-tuning method is to the rest of chattune (``Method``), and the registry
the method modules add themselves to (``register``). Lives below the method modules, which
import it, and below ``chattune.methods``, which loads them."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch.nn as nn


@dataclass(frozen=True)
class Method:
    """What the rest of chattune knows about a fine-tuning method.

    Attributes:
        name: registry key, the value of ``--method``.
        config_cls: dataclass of the method's own settings (its config section).
        apply: ``apply(model, cfg) -> model`` adds the trainable parts and freezes the rest.
        save: ``save(model, dir, state_dict=None)`` writes the trainable state (safetensors +
            JSON), taken from ``state_dict`` when given (a sharded model's gathered weights).
        load: ``load(base_model, dir) -> model`` rebuilds the trained model on a fresh base.
        disable: ``disable(model)`` is a context manager under which the model behaves
            exactly as the untouched base; None when the base must be reloaded (full FT).
        merge: ``merge(model) -> plain transformers model`` for export; None when the
            method cannot become plain weights (prompt, prefix, bottleneck adapters).
        supports_packing: False where virtual tokens make packed rows wrong.
        description: one line for ``chattune methods``.
        inference: ``inference(model)`` readies a loaded model for decoding (e.g. DoRA
            caches its weight norms); None when nothing is needed.
        route: ``route(model, adapters)`` is a context manager under which one forward runs
            row i on adapter ``adapters[i]`` (None: the base), so tuned and base rows share
            a decode step; None when each needs its own forward.
    """

    name: str
    config_cls: type
    apply: Callable[[nn.Module, object], nn.Module]
    save: Callable[..., None]  # (model, dir, state_dict=None)
    load: Callable[[nn.Module, Path], nn.Module]
    disable: Callable[[nn.Module], ContextManager] | None
    merge: Callable[[nn.Module], nn.Module] | None
    supports_packing: bool
    description: str
    inference: Callable[[nn.Module], None] | None = None
    route: Callable[[nn.Module, list[str | None]], ContextManager] | None = None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def no_disable(model: nn.Module) -> ContextManager:
    return contextlib.nullcontext()
