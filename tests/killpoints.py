"""``python tests/killpoints.py CLI-ARGS...``: the chattune CLI, SIGKILLed at its K-th kill point.

K comes from ``CHATTUNE_KILL_AT`` (0: never). Kill points are placed around everything a
run writes: before each training step, before, in the middle of (a half-written file) and
after each checkpoint file, around every rename, between the halves of each metrics line.
The process prints nothing extra, so the test sees exactly what a user would after a kill.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys

from chattune import cli
from chattune.training import checkpoint
from chattune.training import loop as train

KILL_AT = int(os.environ.get("CHATTUNE_KILL_AT", "0"))
TRACE = os.environ.get("CHATTUNE_KILL_TRACE")  # print each point (to choose them for a test)
_count = 0


def point(what: str) -> None:
    global _count
    _count += 1
    if TRACE:
        print(f"kill point {_count}: {what}", file=sys.stderr, flush=True)
    if _count == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_file(path, data: bytes, _real=checkpoint.write_file) -> None:
    name = f"{path.parent.name}/{path.name}"
    point(f"before writing {name}")
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
    point(f"{name} half written")
    _real(path, data)
    point(f"{name} written")


def _rename(self, target, _real=pathlib.Path.rename):
    point(f"before renaming {self.name} to {pathlib.Path(target).name}")
    result = _real(self, target)
    point(f"renamed {self.name} to {pathlib.Path(target).name}")
    return result


class _TornAppend:
    def __init__(self, f):
        self.f = f

    def write(self, text: str) -> None:
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        point("half a metrics line written")
        self.f.write(text[len(text) // 2:])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _open(path, mode="r", *args, **kwargs):
    f = open(path, mode, *args, **kwargs)
    return _TornAppend(f) if "a" in mode else f


def _step(self, group, _real=train.Trainer.step):
    point(f"before step {self.state['step'] + 1}")
    return _real(self, group)


checkpoint.write_file = _write_file
pathlib.Path.rename = _rename
train.open = _open
train.Trainer.step = _step

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
