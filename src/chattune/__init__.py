"""chattune: fine-tune a causal LM into a chat assistant, from the command line or Python.

``import chattune`` is light: the functions below import torch and transformers when
first used. ``chattune.api`` documents them; ``docs/python.md`` walks through them.

``chattune.evaluate`` and ``chattune.compare`` are both a function of the API and the
name of a subpackage. The package keeps the function in the attribute (the import system
would otherwise overwrite it with the subpackage on first import) and the function
hands attribute lookups on to its subpackage, so ``chattune.evaluate(run)`` and
``chattune.evaluate.report`` both work.
"""

import functools
import importlib
import sys
import types

from chattune.errors import UserError

__version__ = "0.1.0"

__all__ = ["Answer", "Chatbot", "CompareResult", "DEFAULTS", "EvalResult", "Exported", "GREEDY", "Run",
           "SamplingParams", "UserError", "compare", "data", "evaluate", "export", "load", "train", "__version__"]

_FROM = {"DEFAULTS": "chattune.engine.sampling", "GREEDY": "chattune.engine.sampling",
         "SamplingParams": "chattune.engine.sampling"}


class _Entry:
    # An API function that also stands for the subpackage of the same name; its __doc__
    # is the function's.

    def __init__(self, name: str):
        self._name, self._package = name, f"chattune.{name}"

    @functools.cached_property
    def _function(self):
        return getattr(importlib.import_module("chattune.api"), self._name)

    def __call__(self, *args, **kwargs):
        return self._function(*args, **kwargs)

    @property
    def __doc__(self) -> str:  # noqa: D105
        return self._function.__doc__

    @property
    def __wrapped__(self):
        return self._function

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(importlib.import_module(self._package), name)

    def __repr__(self) -> str:
        return f"<function chattune.{self._name}>"


evaluate = _Entry("evaluate")
compare = _Entry("compare")


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if isinstance(globals().get(name), _Entry) and isinstance(value, types.ModuleType):
            return  # the subpackage stays importable; the attribute stays the API function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name == "data":
        return importlib.import_module("chattune.data")
    if name in _FROM or name in __all__:
        value = getattr(importlib.import_module(_FROM.get(name, "chattune.api")), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chattune' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
