"""The one registry of fine-tuning methods.

Every method exposes the same small surface (a config dataclass and ``apply``, plus save,
load, a way to switch itself off and, where possible, a merge into plain weights); the
training loop, eval, chat and export only ever talk to a ``Method``.
"""

from __future__ import annotations

import contextlib

from chattune.config import closest
from chattune.errors import UserError
from chattune.methods.method import REGISTRY, Method, count_parameters, no_disable, register

__all__ = ["REGISTRY", "Method", "all_methods", "count_parameters", "get_method", "no_disable", "register"]


def get_method(name: str) -> Method:
    _load_all()
    if name not in REGISTRY:
        raise UserError(f"unknown method '{name}'{closest(name, list(REGISTRY))}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def all_methods() -> dict[str, Method]:
    """Every method, in the same order whichever module was imported first: the method
    modules in ``_load_all``'s order, each in its registration order."""
    _load_all()
    order = [f"chattune.methods.{m}" for m in _MODULES]
    def rank(m: Method) -> int:
        return order.index(m.apply.__module__) if m.apply.__module__ in order else len(order)

    return {m.name: m for m in sorted(REGISTRY.values(), key=rank)}


_MODULES = ("peft_methods", "adapter", "full")  # the method modules, in the order they are listed


def _load_all() -> None:
    # Import for the side effect of registration; kept lazy so `import chattune` stays light.
    from chattune.methods import peft_methods  # noqa: F401

    with contextlib.suppress(ImportError):
        from chattune.methods import adapter  # noqa: F401
    from chattune.methods import full  # noqa: F401
