"""``chattune train --resume RUN``: which settings may change, and which checkpoint to load.

A resumed run is the same run: its saved ``config.yaml`` is the config. Flags given with
``--resume`` may only extend or shorten the budget (``--max-steps``, ``--max-tokens``,
``--epochs``; the cosine schedule is then re-planned for the new total) or change the
evaluation, logging and checkpoint cadence. Anything else would silently make a different
run out of the same weights, so it is refused, naming the setting.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from chattune.training import checkpoint as ckpt, rundir
from chattune.config import from_dict, merge, parse_overrides, set_dotted, to_dict
from chattune.errors import UserError
from chattune.files import atomic_text

BUDGET = ("train.max_tokens", "train.max_steps", "train.epochs")  # highest precedence first
CADENCE = ("train.eval_every", "train.log_every", "train.save_every")


def _flat(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _resolved(cfg) -> dict:
    """Flat settings, with the method's section resolved: ``r: 8`` given equals the default 8."""
    data = to_dict(cfg)
    data["method"] = {"name": cfg.method.name, cfg.method.name: to_dict(cfg.method.settings())}
    return _flat(data)


def resume_config(run_dir: Path, flags: dict, overrides: list[str]):
    """The saved config with the allowed changes applied; refuses any other change.

    Args:
        run_dir: the run to resume.
        flags: dotted config key -> value, for the flags given on the command line.
        overrides: ``--set KEY=VALUE`` items.
    """
    from chattune.training.settings import RunConfig

    old = rundir.read_config(run_dir)
    given: dict = {}
    for key, value in flags.items():
        set_dotted(given, key, value)
    given = merge(given, parse_overrides(overrides))
    passed = set(_flat(given)) if given else set()
    data = merge(to_dict(old), given)
    if passed & set(BUDGET):
        # the budget given is the budget: a saved max_steps must not outrank a new --epochs
        for key in BUDGET[:2]:
            if key not in passed:
                set_dotted(data, key, None)
    data["train"]["output_dir"] = str(run_dir)
    new = from_dict(RunConfig, data, "config")
    a, b = _resolved(old), _resolved(new)
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "train.output_dir"]
    refused = sorted((k for k in changed if k not in BUDGET + CADENCE), key=lambda k: (k.count("."), k))
    if refused:
        key = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise UserError(f"--resume cannot change {key} ({a.get(key)!r} -> {b.get(key)!r}){more}: it would be another "
                        f"run; start one with a new --output-dir, or resume with only --max-steps/--max-tokens/"
                        f"--epochs or the eval/log/save cadence")
    return new, changed


def restore(run_dir: Path, model, optimizer, scheduler, main: bool = True) -> tuple[dict | None, list[Path]]:
    """Load the newest checkpoint that loads, and list the ones before it that did not (None:
    there is no checkpoint at all, the run was stopped before its first one). Each
    bad one is reported in one line naming its file, then a warning says which one is used
    instead. None left: UserError (exit 2). The caller sets the bad ones aside
    (``checkpoint.set_aside``) once every process has loaded."""
    if main:
        ckpt.settle(run_dir)
    found = ckpt.candidates(run_dir)
    if not found:
        return None, []
    bad: list[Path] = []
    for path in found:
        try:
            state = ckpt.load_checkpoint(path, model, optimizer, scheduler)
        except ckpt.CheckpointError as e:
            if main:
                print(f"chattune: warning: checkpoint {e}", file=sys.stderr, flush=True)
            bad.append((path, e))
            continue
        if bad and main:
            print(f"chattune: warning: resuming from the previous checkpoint {path} (step {state['step']}); "
                  f"the bad one is kept as {bad[-1][0].name}.bad", file=sys.stderr, flush=True)
        return state, [p for p, _ in bad]
    raise UserError(f"{run_dir}: no checkpoint could be loaded ({bad[-1][1]})")


def forget_metrics_after(path: Path, step: int) -> None:
    """A killed run logged steps past its last checkpoint; the resumed run redoes them. Lines
    torn by a kill or a full disk are dropped too."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line + "\n")
    atomic_text(path, "".join(keep))


def resume_from_checkpoint(run_dir: Path, model, optimizer, scheduler, acc, total_steps: int) -> dict | None:
    """``--resume``: load the newest checkpoint that loads into ``model``, ``optimizer`` and
    ``scheduler`` (falling back), set bad ones aside, forget metrics past it, and say so when
    the budget is already spent. Returns the checkpoint's loop state, None when there is none."""
    state, bad = restore(run_dir, model, optimizer, scheduler, acc.is_main_process)
    if state is None:  # stopped before its first checkpoint: the same seed starts the same run again
        if acc.is_main_process:
            print(f"{run_dir} has no checkpoint yet: training it from step 0", file=sys.stderr, flush=True)
            forget_metrics_after(run_dir / "metrics.jsonl", 0)
        return None
    acc.wait_for_everyone()  # every process has read the files before any is moved
    if acc.is_main_process:
        for path in bad:
            ckpt.set_aside(path)
        forget_metrics_after(run_dir / "metrics.jsonl", state["step"])
        if state["step"] >= total_steps:
            print(f"{run_dir} is already at step {state['step']}, at or past its budget of {total_steps} "
                  f"steps: nothing to train (extend it with a larger --max-steps, --max-tokens or --epochs)",
                  file=sys.stderr, flush=True)
    return state
