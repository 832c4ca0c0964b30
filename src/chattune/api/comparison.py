"""``chattune.compare``: ``chattune compare`` from Python, its table returned as rows."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.config import closest
from chattune.errors import UserError


@dataclass
class CompareResult:
    """A finished comparison.

    Attributes:
        output_dir: OUT: every method's run, ``results.*``, ``plots/`` and ``report.html``.
        base: the base model's row (None when there is none).
        rows: one row per method, as in ``results.json``; ``status`` is ``done`` or ``failed``.
    """

    output_dir: Path
    base: dict | None
    rows: list[dict]

    @property
    def report(self) -> Path:
        """The HTML report."""
        return self.output_dir / "report.html"

    @property
    def failed(self) -> list[str]:
        """The methods that did not finish (their ``error`` says why)."""
        return [r["method"] for r in self.rows if r["status"] != "done"]

    def table(self) -> str:
        """The Markdown table ``chattune compare`` prints."""
        from chattune.compare.report import markdown_table

        return markdown_table(([self.base] if self.base else []) + self.rows)

    def __str__(self) -> str:
        return self.table()

    def to_dataframe(self):
        """The base row and the method rows as a pandas DataFrame (pandas is optional)."""
        from chattune.api.results import to_dataframe

        return to_dataframe(([self.base] if self.base else []) + self.rows)


def compare(config: str | Path | None = None, *, preset: str | None = None, methods: str | Sequence[str] | None = None,
            max_steps: int | None = None, max_tokens: int | None = None, output_dir: str | Path | None = None,
            overrides: Sequence[str] = (), verbose: bool = False, **settings: Any) -> CompareResult:
    """Train and evaluate several methods under one token budget, as ``chattune compare`` does.

    Each method trains in its own process; re-running with the same settings resumes.

    Args:
        config: a YAML file with run sections and a ``compare:`` section.
        preset: a ready comparison from ``configs/compare-NAME.yaml``, e.g. ``cpu-small``.
        methods: the methods, in order (default lora, adapter, prompt, prefix).
        max_steps: the budget: the tokens that this many packed optimiser steps see.
        max_tokens: the budget: conversation tokens every method trains on.
        output_dir: OUT (default ``runs/compare``).
        overrides: ``"section.key=value"`` strings, as ``--set`` takes them.
        verbose: library logs in the methods' processes.
        **settings: the shared run settings by their flag names: model, dataset, format,
            epochs, lr, batch_size, grad_accum, max_length, precision, seed.

    Returns:
        The ``CompareResult``; ``str(result)`` is the CLI's table.

    Raises:
        UserError: a mistake the user can fix, with the message the CLI prints.
    """
    from chattune.compare import command

    unknown = [k for k in settings if k not in command.RUN_FLAGS]
    if unknown:
        raise UserError(f"unknown compare setting '{unknown[0]}'{closest(unknown[0], command.RUN_FLAGS)}")
    if methods is not None and not isinstance(methods, str):
        methods = ",".join(methods)
    args = argparse.Namespace(config=None if config is None else str(config), preset=preset, methods=methods,
                              max_steps=max_steps, max_tokens=max_tokens,
                              output_dir=None if output_dir is None else str(output_dir), set=list(overrides),
                              verbose=verbose, worker=None, with_base=False,
                              **{k: settings.get(k) for k in command.RUN_FLAGS})
    out, base, rows = command.compare(args)
    return CompareResult(out, base, rows)
