"""Where an evaluation's time goes: ``chattune eval`` with the engine's phases timed.

    .venv/bin/python benchmarks/eval_phases.py RUN --prompts ../shared/data/arena_hard_v0.1.jsonl --num-prompts 24

Takes ``chattune eval``'s own arguments and runs it unchanged, with ``Engine._prefill``,
``Engine._decode``, the lanes' join (``Lane.add``) and leave (``Lane.drop``), the token
choice and the metrics (the reference-answer loss included) wrapped in timers. Prefill
includes the joins it triggers and decode the leaves. Prints seconds and calls per phase,
decode steps by row count (mean ms a step, mean cache width and padding share), and as
the last line one JSON object with the same numbers, all on standard error (standard
output keeps ``chattune eval``'s own, e.g. its ``--json``).
"""

from __future__ import annotations

import collections
import json
import sys
import time

from chattune.cli import main as chattune_main
from chattune.engine import core
from chattune.engine import lane as lanes
from chattune.evaluate import run as eval_run

seconds: collections.Counter = collections.Counter()
calls: collections.Counter = collections.Counter()
steps: list[tuple[int, int, int, float]] = []  # (rows, cache width, padded positions, seconds)


def _timed(owner, name: str, phase: str) -> None:
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[phase] += time.perf_counter() - start
            calls[phase] += 1

    setattr(owner, name, wrapper)


def _step_log() -> None:
    decode = core.Engine._decode

    def wrapper(self, lane):
        rows, width = len(lane.rows), lane.width
        padded = sum(width - r.length for r in lane.rows)
        start = time.perf_counter()
        decode(self, lane)
        steps.append((rows, width, padded, time.perf_counter() - start))

    core.Engine._decode = wrapper


def _by_rows() -> dict:
    groups: dict[str, list] = collections.defaultdict(list)
    for rows, width, padded, sec in steps:
        groups["32+" if rows >= 32 else "16-31" if rows >= 16 else "7-15" if rows >= 7 else "4-6" if rows >= 4
               else "1-3"].append(
            (width, padded / (rows * width) if width else 0.0, sec))
    return {k: {"steps": len(v), "ms_per_step": round(1000 * sum(x[2] for x in v) / len(v), 1),
                "mean_width": round(sum(x[0] for x in v) / len(v)), "padding_share": round(sum(x[1] for x in v) / len(v), 2)}
            for k, v in sorted(groups.items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+")))}


def instrument() -> None:
    """Wrap the engine's phases in timers (for this process)."""
    _step_log()
    _timed(core.Engine, "_decode", "decode")
    _timed(core.Engine, "_prefill", "prefill")
    _timed(core.Engine, "_choose", "choose")
    _timed(lanes.Lane, "add", "join")
    _timed(lanes.Lane, "drop", "leave")


def report(wall_s: float) -> dict:
    """What the timers saw since ``instrument()``, printed on standard error and returned."""
    out = {"wall_s": round(wall_s, 1),
           "phases": {k: {"s": round(v, 1), "calls": calls[k]} for k, v in seconds.most_common()},
           "decode_steps": _by_rows()}
    for phase, v in out["phases"].items():
        print(f"{phase:17s} {v['s']:8.1f} s  {v['calls']} calls", file=sys.stderr)
    for group, v in out["decode_steps"].items():
        print(f"{group:>5s} rows: {v['steps']} steps, {v['ms_per_step']} ms a step, width {v['mean_width']}, "
              f"padding {v['padding_share']:.0%}", file=sys.stderr)
    return out


def main() -> None:
    instrument()
    _timed(eval_run, "_decode", "answers")
    _timed(eval_run, "_metrics", "metrics_and_loss")
    start = time.perf_counter()
    rc = chattune_main(["eval", *sys.argv[1:]])
    if rc:
        sys.exit(rc)
    print(json.dumps(report(time.perf_counter() - start)), file=sys.stderr)


if __name__ == "__main__":
    main()
