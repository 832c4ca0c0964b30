"""What keeps a run directory whole while a user does what users do: one writer at a time
(a pid lock), Ctrl-C / SIGTERM turned into a checkpoint at the next step boundary, and a
full disk turned into one line.

Written here because neither accelerate nor transformers has them for a custom loop:
``transformers.Trainer`` has no lock and dies on the first Ctrl-C; ``filelock`` would
block or time out instead of naming the live process, and cannot tell a lock left by a
killed process from a live one.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from pathlib import Path

from chattune.errors import UserError

LOCK = ".lock"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), so a reused pid is not taken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 overall; the name in (...) may hold spaces


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now = _start_time(pid)
    return started is None or now is None or now == started


class RunLock:
    """``with RunLock(run_dir, "train"):`` holds ``run_dir/.lock`` (pid and start time).

    A lock held by a live process is refused with a line naming its pid; one left by a
    process that no longer exists is taken over with a note on stderr."""

    def __init__(self, run_dir: Path, what: str = "train"):
        self.path = Path(run_dir) / LOCK
        self.what = what
        self.held = False

    def __enter__(self) -> RunLock:
        self.created = not self.path.parent.exists()  # removed again if nothing was written into it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {_start_time(os.getpid()) or '-'} {self.what}\n"
        for _ in range(3):  # a race with another taker: re-read and retry
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise UserError(f"{self.path.parent}: cannot take the run lock {self.path}; is another chattune starting?")

    def _refuse_or_clear(self) -> None:
        try:
            pid_s, started, *what = self.path.read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            pid, started, what = None, None, []  # empty or torn: its writer died before writing it
        if pid is not None and _alive(pid, None if started == "-" else started):
            raise UserError(f"{self.path.parent} is in use by process {pid} (chattune {' '.join(what) or 'train'}); "
                            f"wait for it to finish or stop it first")
        gone = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
        try:
            os.rename(self.path, gone)  # atomic: only one taker wins the stale lock
        except FileNotFoundError:
            return
        gone.unlink(missing_ok=True)
        who = f"process {pid}" if pid is not None else "a process"
        print(f"chattune: note: taking over the lock of {self.path.parent} left by {who}, which is no longer "
              f"running", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.held:
            try:
                if self.path.read_text().split()[0] == str(os.getpid()):
                    self.path.unlink()
            except (OSError, IndexError):
                pass
            self.held = False
            if self.created:
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass  # not empty: the run wrote something


class Interrupted(Exception):
    """Training stopped by a signal after writing the checkpoint of ``step``."""

    def __init__(self, step: int, signum: int, run_dir: Path):
        super().__init__(f"interrupted at step {step}; continue with: chattune train --resume {run_dir}")
        self.step, self.signum, self.run_dir = step, signum, run_dir

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class Abort(KeyboardInterrupt):
    """A second signal: stop at once; the previous checkpoint is what remains."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum


class Interrupts:
    """``with Interrupts() as stop:`` the first SIGINT/SIGTERM sets ``stop.signum`` (the loop
    checkpoints and stops at the next step boundary); a second one raises ``Abort`` at once."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            print(f"\nchattune: {signal.Signals(signum).name} again: stopping now; the last checkpoint is kept",
                  file=sys.stderr, flush=True)
            raise Abort(signum)
        self.signum = signum
        print(f"\nchattune: {signal.Signals(signum).name}: stopping after this step with a checkpoint "
              f"(again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            # After a first signal the run is stopping with its checkpoint written: a second
            # one, on the way out, must not meet Python's default handler (a KeyboardInterrupt
            # traceback from whatever finalizer runs then).
            signal.signal(s, self._late if self.signum is not None else old)
        self._old = {}

    def _late(self, signum, frame) -> None:
        print(f"\nchattune: {signal.Signals(signum).name} again: stopping now; the last checkpoint is kept",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + signum)


DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}


def write_error(e: Exception, what: Path, kept: Path | None) -> UserError:
    """One line for a failed write: what was being written, the error, what is still intact."""
    reason = DISK_ERRORS.get(getattr(e, "errno", None)) or getattr(e, "strerror", None) or str(e) or type(e).__name__
    file = getattr(e, "filename", None)
    where = f" ({file})" if file and str(file) != str(what) else ""
    tail = f"; the checkpoint in {kept} is intact" if kept else ""
    return UserError(f"cannot write {what}: {reason}{where}{tail}")


def interrupt_signal(interrupts: Interrupts | None, acc) -> int | None:
    """The signal a run has received, if any. Every process must stop at the same step
    boundary, so the flag is reduced across ``acc``'s processes."""
    signum = interrupts.signum if interrupts else None
    if acc.num_processes > 1:
        import torch

        flag = torch.tensor([float(signum or 0)], device=acc.device)
        signum = int(acc.reduce(flag, reduction="max")) or None
    return signum
