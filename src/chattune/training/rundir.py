"""The one reader of a run directory.

A run directory holds ``config.yaml`` (the resolved settings, written first),
``run_info.json`` (written with it: parameter counts, precision, data statistics, the
chattune version), ``tokenizer/``, and ``adapter/`` (the trained weights, written at the
first save: a run without it has not finished a save yet). Every command that opens a run
(``train --resume``, ``--init-from``, ``eval``, ``chat``, ``export``, ``serve``) reads it
here, so each mistake a user can meet is worded once.
"""

from __future__ import annotations

import json
from pathlib import Path

from chattune.config import from_dict, load_yaml
from chattune.errors import UserError

CONFIG, INFO, ADAPTER, TOKENIZER = "config.yaml", "run_info.json", "adapter", "tokenizer"


def raw_config(run_dir: Path) -> dict:
    """The run's saved settings as a plain mapping (what ``--resume`` merges flags into)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} is not a chattune run directory (no {CONFIG})")
    return load_yaml(run_dir / CONFIG)


def read_config(run_dir: Path, finished: bool = False):
    """The run's ``RunConfig``; with ``finished``, only for a run that has trained weights.

    Raises UserError for a directory that is not a run, a run with no weights yet (when
    ``finished``), and a run whose settings this version of chattune does not know."""
    from chattune.training.settings import RunConfig

    run_dir = Path(run_dir)
    if finished and not ((run_dir / CONFIG).is_file() and (run_dir / ADAPTER).is_dir()):
        raise UserError(f"{run_dir} is not a finished chattune run (needs {CONFIG} and {ADAPTER}/)")
    raw = raw_config(run_dir)
    try:
        return from_dict(RunConfig, raw, "config")
    except UserError as e:
        version = (read_info(run_dir) or {}).get("chattune_version", "an older version")
        raise UserError(f"{run_dir}/{CONFIG} was written by chattune {version} and does not load here: {e}") from None


def read_info(run_dir: Path) -> dict | None:
    """``run_info.json``, or None when the run has none (or a torn one)."""
    try:
        return json.loads((Path(run_dir) / INFO).read_text())
    except (OSError, ValueError):
        return None


def adapter_dir(run_dir: Path) -> Path:
    return Path(run_dir) / ADAPTER


def tokenizer_dir(run_dir: Path) -> Path:
    return Path(run_dir) / TOKENIZER
