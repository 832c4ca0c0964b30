"""``chattune.train`` and the ``Run`` it returns: the settings of ``chattune train`` from Python."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chattune.config import closest, to_dict
from chattune.errors import UserError

if TYPE_CHECKING:
    from chattune.api.chatbot import Chatbot
    from chattune.api.results import EvalResult, Exported
    from chattune.training.settings import RunConfig

SECTIONS = ("model", "data", "method", "train", "eval")


@dataclass
class Run:
    """A run directory: what ``chattune.train`` returns, or ``Run("runs/x")`` for an earlier one.

    Attributes:
        dir: the run directory (``config.yaml``, ``adapter/``, ``metrics.jsonl``, ...).
        summary: the training summary (``summary.json``); None while the run has none.
    """

    dir: Path
    summary: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        self.dir = Path(self.dir)
        if self.summary is None and (self.dir / "summary.json").is_file():
            self.summary = json.loads((self.dir / "summary.json").read_text())

    def __fspath__(self) -> str:
        return str(self.dir)

    @property
    def config(self) -> RunConfig:
        """The run's resolved settings, as saved in its ``config.yaml``."""
        from chattune.training import rundir

        return rundir.read_config(self.dir)

    @property
    def metrics(self) -> list[dict]:
        """Every line of ``metrics.jsonl``: training losses, validation passes, rates."""
        path = self.dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def losses(self) -> list[float]:
        """The logged training losses, one per ``train.log_every`` steps."""
        return [m["loss"] for m in self.metrics if "loss" in m]

    def load(self, base: bool = False) -> Chatbot:
        """This run on the decoding engine; ``base=True`` answers with the method switched off."""
        from chattune.api.chatbot import load

        return load(self, base=base)

    def evaluate(self, prompts: str | None = None, **options: Any) -> EvalResult:
        """``chattune.evaluate(self, prompts, **options)``."""
        from chattune.api.results import evaluate

        return evaluate(self, prompts, **options)

    def export(self, out: str | Path) -> Exported:
        """``chattune.export(self, out)``."""
        from chattune.api.results import export

        return export(self, out)


def train(config: str | Path | RunConfig | dict | None = None, *, resume: str | Path | None = None,
          overrides: Sequence[str] = (), **settings: Any) -> Run:
    """Train one run, exactly as ``chattune train`` does, and return it.

    Settings are applied in the CLI's order, later wins: ``config``, then the common
    settings by their flag names, then whole sections, then ``overrides``.

    Args:
        config: a YAML path, a ``RunConfig``, or a mapping with the YAML's sections.
        resume: continue this stopped run from its checkpoint (``--resume``); its own
            ``config.yaml`` is the config, settings may change only what resuming allows.
        overrides: ``"section.key=value"`` strings, as ``--set`` takes them.
        **settings: the common flags by name (``model``, ``dataset``, ``method``,
            ``max_steps``, ``lr``, ``output_dir``, ``init_from``, ...: ``chattune train
            --help``), or a section as a mapping, e.g. ``train={"warmup_ratio": 0}``,
            ``method={"name": "lora", "lora": {"r": 16}}``.

    Returns:
        The finished ``Run`` (directory, summary, metrics).

    Raises:
        UserError: a mistake the user can fix, with the message the CLI prints.
        chattune.training.runguard.Interrupted: after a first Ctrl-C or SIGTERM; the run
            wrote its checkpoint and ``train(resume=...)`` continues it.
    """
    flags, sections = _split(settings)
    if resume is not None:
        cfg = _resume_config(config, resume, flags, sections, overrides)
    else:
        cfg = _new_config(config, flags, sections, overrides)
    return Run(Path(cfg.train.output_dir), _train(cfg, resume is not None))


def _split(settings: dict) -> tuple[dict, dict]:
    """Keyword settings -> (common flags by FLAG_KEYS name, whole sections)."""
    from chattune.training.settings import FLAG_KEYS

    flags, sections = {}, {}
    for name, value in settings.items():
        if name in SECTIONS and isinstance(value, dict):
            sections[name] = value
        elif name in FLAG_KEYS:
            flags[name] = value
        else:
            raise UserError(f"unknown setting '{name}'{closest(name, [*FLAG_KEYS, *SECTIONS])}; "
                            f"settings are train's flag names or the sections {', '.join(SECTIONS)}")
    return flags, sections


def _dotted(data: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resume_config(config, resume, flags: dict, sections: dict, overrides: Sequence[str]):
    from chattune.training.resume import resume_config
    from chattune.training.settings import FLAG_KEYS

    if config is not None:
        raise UserError("--resume reads the run's own config.yaml; do not pass --config with it")
    out = flags.get("output_dir")
    if out and Path(out).resolve() != Path(resume).resolve():
        raise UserError("--resume continues RUN in its own directory; drop --output-dir")
    given = {FLAG_KEYS[k]: v for k, v in flags.items() if v is not None and k != "output_dir"}
    given.update(_dotted(sections))
    cfg, changed = resume_config(Path(resume), given, list(overrides))
    if changed:
        print(f"resuming {resume} with {', '.join(changed)} changed", file=sys.stderr)
    return cfg


def _new_config(config, flags: dict, sections: dict, overrides: Sequence[str]):
    from chattune.training.settings import build_config

    if flags.get("init_from") and not (flags.get("model") or config or "name" in sections.get("model", {})):
        from chattune.training import rundir  # the earlier run's base model, unless told otherwise

        flags = {**flags, "model": rundir.raw_config(Path(flags["init_from"]))["model"]["name"]}
    if config is not None and not isinstance(config, (str, Path, dict)):
        config = to_dict(config)  # a RunConfig
    return build_config(config, flags, list(overrides), sections)


def _train(cfg, resume: bool) -> dict:
    from chattune.training.loop import train as train_loop

    try:
        return train_loop(cfg, resume=resume)
    except OSError as e:  # a full disk outside the checkpoint/metrics writes (config, summary, ...)
        from chattune.training.checkpoint import find_checkpoint
        from chattune.training.runguard import DISK_ERRORS, write_error

        if e.errno not in DISK_ERRORS:
            raise
        run_dir = Path(cfg.train.output_dir)
        raise write_error(e, Path(e.filename or run_dir), find_checkpoint(run_dir)) from None
