"""``chattune compare``: every method on the same data, token budget, seed and evaluation
prompts, then one report to read (``chattune.compare.report``).

Layout of the output directory OUT::

    compare.yaml        the resolved settings; re-running needs the same ones, and resumes
    <method>/           an ordinary run directory (``chattune chat OUT/lora`` works), plus
                        eval_test.json, times.json and, once the method is finished,
                        result.json (its row of the table)
    base.json           the base model's numbers (method switched off), computed once
    logs/<method>.log   everything the method's subprocess printed
    results.json, results.csv, results.md, plots/*.png, report.html

The token budget: ``--max-tokens T`` trains every method until it has seen T conversation
tokens (``train.max_tokens``, counted the same way with and without packing).
``--max-steps N`` becomes the tokens that N optimiser steps see with packing, so methods
that pack (lora, adapter, ia3, dora, full) take exactly N steps, while prompt and prefix
tuning, which cannot pack, take as many shorter steps as they need to see the same tokens.

Each method trains and is evaluated in its own subprocess (``chattune compare --worker``):
``ru_maxrss`` never goes down within a process, so only a fresh process measures one
method's peak, and a crash of one method cannot stop the others. Linux also carries the
parent's RSS high-water mark into a child across fork and exec, so this process never
loads a model. The sweep is written by hand; training and evaluation are chattune's own.
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from chattune.config import field, from_dict, load_yaml, merge, parse_overrides, set_dotted, to_dict
from chattune.errors import UserError
from chattune.compare.plan import method_config
from chattune.files import read_json

CONFIG_DIR = Path(__file__).parents[3] / "configs"
# Train settings a method may choose for itself (compare.per_method); everything else is
# shared, so the methods differ only in what is being compared.
SHARED_TRAIN_KEYS = {"seed", "max_tokens", "max_steps", "epochs", "output_dir"}
# Command-line flags that set the shared run config (chattune.training.settings.FLAG_KEYS names).
RUN_FLAGS = ["model", "dataset", "format", "epochs", "lr", "batch_size", "grad_accum", "max_length", "precision",
             "seed"]


@dataclass
class CompareArgs:
    methods: list[str] = field(["lora", "adapter", "prompt", "prefix"], help="methods to train, in this order")
    max_steps: int | None = field(None, help="budget: the tokens that this many packed optimiser steps see")
    max_tokens: int | None = field(None, help="budget: conversation tokens every method trains on")
    output_dir: str = field("runs/compare", help="where the runs and the report go")
    eval_points: int = field(5, help="validation passes per run, for the loss curve (unless train.eval_every is set)")
    per_method: dict = field({}, help="train settings of one method, e.g. {prompt: {lr: 3.0e-2}}")

    def __post_init__(self):
        if not self.methods:
            raise UserError("compare.methods is empty")
        if len(set(self.methods)) != len(self.methods):
            raise UserError(f"compare.methods lists a method twice: {', '.join(self.methods)}")
        if self.max_steps is not None and self.max_tokens is not None:
            raise UserError("give the budget as --max-steps or --max-tokens, not both")
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"compare.{name} must be >= 1")
        if self.eval_points < 1:
            raise UserError("compare.eval_points must be >= 1")


def add_parser(subparsers) -> None:
    """Register ``chattune compare`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "compare", help="train and evaluate several methods under one token budget, then one report",
        description="Config: YAML run sections plus a compare: section (methods, max_steps, max_tokens, "
                    "output_dir, eval_points, per_method); flags override it, then --set KEY=VALUE.")
    p.add_argument("--config", help="YAML: model, data, method, train, eval sections and a compare: section")
    p.add_argument("--preset", help="a ready comparison from configs/compare-NAME.yaml, e.g. cpu-small")
    p.add_argument("--methods", help="comma-separated (default lora,adapter,prompt,prefix)")
    p.add_argument("--max-steps", type=int, help="budget: the tokens of this many packed optimiser steps")
    p.add_argument("--max-tokens", type=int, help="budget: conversation tokens every method trains on")
    p.add_argument("--output-dir", help="output directory (default runs/compare); re-running resumes it")
    from chattune.training.flags import add_train_flags

    add_train_flags(p, RUN_FLAGS)  # the train flags' own definitions: one setting, one description
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, e.g. method.lora.r=16 or compare.per_method.prompt.lr=0.03")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one method's subprocess
    p.add_argument("--with-base", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args) -> int:
    """Run (or resume) a comparison and write its report; 1 when a method failed."""
    if args.worker:
        from chattune.compare.worker import work

        return work(Path(args.output_dir), args.worker, args.with_base)
    out, base, rows = compare(args)
    from chattune.compare.report import markdown_table

    print(markdown_table(([base] if base else []) + rows))
    print(f"\nreport: {out / 'report.html'}")
    failed = [r["method"] for r in rows if r["status"] != "done"]
    if failed:
        print(f"chattune compare: {len(failed)} of {len(rows)} methods failed ({', '.join(failed)}); "
              f"see the error column", file=sys.stderr)
    return 1 if failed else 0


def compare(args) -> tuple[Path, dict | None, list[dict]]:
    """Run (or resume) the comparison ``args`` describe and write its report.

    Returns OUT, the base model's row (None when it has none yet) and one row per method."""
    record = resolve(args)
    out = Path(record["output_dir"])
    from chattune.training.runguard import RunLock

    with RunLock(out, "compare"):  # one comparison per OUT; each method's run has its own lock too
        claim(out, record)
        rows = sweep(out, record["methods"], verbose=getattr(args, "verbose", False))
        from chattune.compare.report import base_row, write_report

        base = base_row(read_json(out / "base.json"))
        write_report(out, record, base, rows)
    return out, base, rows


# -- settings -----------------------------------------------------------------------------
def resolve(args) -> dict:
    """The comparison's full settings: shared run config, methods, token budget."""
    from chattune.methods import get_method
    from chattune.training.settings import FLAG_KEYS, RunConfig

    if args.preset and args.config:
        raise UserError("--preset is a config file already; pass --preset or --config, not both")
    raw = load_yaml(preset_path(args.preset) if args.preset else args.config) if (args.preset or args.config) else {}
    overrides = parse_overrides(args.set)
    flags: dict = {}
    for name in RUN_FLAGS:
        if getattr(args, name, None) is not None:
            set_dotted(flags, FLAG_KEYS[name], getattr(args, name))
    cmp_flags = {k: getattr(args, k) for k in ("methods", "max_steps", "max_tokens", "output_dir")
                 if getattr(args, k, None) is not None}
    comp = from_dict(CompareArgs, merge(merge(raw.pop("compare", None) or {}, cmp_flags),
                                        overrides.pop("compare", None) or {}), "compare")
    run_raw = merge(merge(raw, flags), overrides)
    if "name" in run_raw.get("method", {}) or "output_dir" in run_raw.get("train", {}):
        raise UserError("compare sets method.name and train.output_dir itself: use --methods and --output-dir")
    if args.preset:
        _find_preset_dataset(run_raw)
    cfg = from_dict(RunConfig, run_raw, "config")
    if cfg.data.test_ratio <= 0:
        raise UserError("compare evaluates every method on the test split: data.test_ratio must be above 0")
    for m in comp.methods:
        get_method(m)  # unknown names fail here, with a suggestion
    _check_per_method(comp)
    record = {"methods": comp.methods, "output_dir": comp.output_dir, "eval_points": comp.eval_points,
              "eval_every_set": "eval_every" in run_raw.get("train", {}), "per_method": comp.per_method,
              "budget": token_budget(cfg, comp), "device": _device()}
    shared = to_dict(cfg)
    del shared["method"]["name"], shared["train"]["output_dir"]
    shared["train"].update(max_tokens=record["budget"]["max_tokens"], max_steps=None)
    record["config"] = shared
    for m in comp.methods:
        method_config(record, m, Path(comp.output_dir)).method.settings()  # bad method settings fail now
    return record


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"compare-{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("compare-") for p in CONFIG_DIR.glob("compare-*.yaml"))
        raise UserError(f"unknown preset '{name}'; known: {', '.join(known) or 'none (configs/ not found)'}")
    return path


def _find_preset_dataset(run_raw: dict) -> None:
    # Preset files name the dataset relative to the repository root; accept any cwd.
    data = run_raw.get("data", {})
    path = Path(data.get("dataset", ""))
    if not path.is_absolute() and not path.exists() and (CONFIG_DIR.parent / path).exists():
        data["dataset"] = str((CONFIG_DIR.parent / path).resolve())


def _check_per_method(comp: CompareArgs) -> None:
    from chattune.methods import get_method

    for method, settings in comp.per_method.items():
        get_method(method)  # a preset may hold settings for methods left out by --methods
        if not isinstance(settings, dict):
            raise UserError(f"compare.per_method.{method} must map train keys to values, e.g. {{lr: 0.03}}")
        shared = SHARED_TRAIN_KEYS & set(settings)
        if shared:
            raise UserError(f"compare.per_method.{method}: {', '.join(sorted(shared))} must be the same "
                            f"for every method")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def token_budget(cfg, comp: CompareArgs) -> dict:
    """Conversation tokens every method trains on, and the steps that takes with and without packing."""
    from chattune.data import prepare
    from chattune.models.loading import load_tokenizer
    from chattune.training.loop import Plan

    samples = prepare(cfg.data, load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)).splits["train"]
    if not samples:
        raise UserError("no training samples left after selection; see `chattune data` for the drop reasons")
    t = cfg.train
    lengths = [len(s["input_ids"]) for s in samples]
    # One process (compare runs no launcher), so a step is grad_accum micro-batches.
    plans = {mode: Plan(samples, t.batch_size, mode == "packed", cfg.data.max_length, t.seed, t.grad_accum)
             for mode in ("packed", "unpacked")}
    # compare's own budget first, then a train section's (a train config reused as is)
    if comp.max_tokens or comp.max_steps:
        tokens, steps = comp.max_tokens, comp.max_steps
    else:
        tokens, steps = t.max_tokens, None if t.max_tokens else t.max_steps
    if tokens:
        budget = tokens
    elif steps:
        reference = plans["unpacked" if t.packing is False else "packed"]
        budget = sum(itertools.islice(_step_tokens(reference, lengths), steps))
    else:
        budget = math.ceil(t.epochs * sum(lengths))
    return {"max_tokens": budget, "from_max_steps": steps,
            "steps": {mode: _steps_for(plan, lengths, budget) for mode, plan in plans.items()}}


def _step_tokens(plan, lengths: list[int]):
    """Conversation tokens of each optimiser step, epoch after epoch (as ``Trainer`` walks them)."""
    for epoch in itertools.count():
        for group in plan.epoch(epoch):
            yield sum(lengths[i] for mb in group for i in mb)


def _steps_for(plan, lengths: list[int], budget: int) -> int:
    seen = 0
    for step, tokens in enumerate(_step_tokens(plan, lengths), 1):
        seen += tokens
        if seen >= budget:
            return step
    raise AssertionError("unreachable")


def claim(out: Path, record: dict) -> None:
    """Start OUT, or check that it holds this very comparison (then it resumes)."""
    path = out / "compare.yaml"
    new = yaml.safe_load(yaml.safe_dump(record))  # what a re-run will read back
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        # the method list may grow or shrink, and OUT may have moved; nothing else may change
        mutable = ("methods", "output_dir")
        diffs = _differences({k: v for k, v in old.items() if k not in mutable},
                             {k: v for k, v in new.items() if k not in mutable})
        if diffs:
            raise UserError(f"{out} holds a comparison with other settings ({', '.join(diffs[:4])}); "
                            f"re-run it with its own settings or pick another --output-dir")
    elif out.exists() and any(p.name != ".lock" for p in out.iterdir()):
        raise UserError(f"{out} exists and is not a chattune compare directory; pick another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(record, sort_keys=False))


def _differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))]
    return [] if a == b else [f"{where}: {a!r} -> {b!r}"]


# -- the sweep (parent process) -----------------------------------------------------------
def sweep(out: Path, methods: list[str], verbose: bool = False) -> list[dict]:
    """Each unfinished method in its own subprocess; finished ones are read back, not rerun."""
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(total=len(methods), desc="compare", unit="method", dynamic_ncols=True)
    try:
        for method in methods:
            done = out / method / "result.json"
            if done.is_file():
                bar.write(f"{method}: finished earlier, skipped", file=sys.stderr)
                rows.append({**json.loads(done.read_text()), "reused": True})
            else:
                bar.set_description(f"compare: {method}")
                bar.write(f"== {method} ==", file=sys.stderr)
                code, last = spawn(out, method, with_base=not (out / "base.json").is_file(), verbose=verbose)
                if code == 0:
                    rows.append({**json.loads(done.read_text()), "reused": False})
                else:
                    rows.append({"method": method, "status": "failed", "error": _error_text(code, last)})
                    bar.write(f"{method} failed: {rows[-1]['error']}", file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()
    return rows


def spawn(out: Path, method: str, with_base: bool, verbose: bool = False) -> tuple[int, str]:
    """Run one method's worker; its output (training bar included) passes through to stderr
    and into logs/<method>.log. Returns (exit code, last line printed)."""
    cmd = [sys.executable, "-m", "chattune.cli", *(["-v"] if verbose else []), "compare", "--worker", method,
           "--output-dir", str(out), *(["--with-base"] if with_base else [])]
    (out / "logs").mkdir(exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = ""
    with open(out / "logs" / f"{method}.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            while chunk := proc.stdout.read1(1 << 16):
                log.write(chunk)
                text = decoder.decode(chunk)
                sys.stderr.write(text)
                sys.stderr.flush()
                tail = (tail + text)[-4000:]
            code = proc.wait()
        finally:  # a terminal's Ctrl-C reaches the child too: it checkpoints and stops; a second
            # SIGINT would make it stop at once, so it gets one only if it is still running after a while
            for action in (None, signal.SIGINT, signal.SIGKILL):
                if proc.poll() is not None:
                    break
                if action is not None:
                    proc.send_signal(action)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
    lines = [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()]
    return code, lines[-1] if lines else ""


def _error_text(code: int, last: str) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return last.removeprefix("chattune: error: ") or f"exit code {code}"
