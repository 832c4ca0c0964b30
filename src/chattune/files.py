"""Writing files so that a kill or a full disk never leaves half of one behind.

Every file chattune writes for a later reader to trust (a checkpoint, the reference
log-probs, a comparison's progress, the converted model cache) goes through these: the
content is written under a temporary name in the same directory and renamed over the
target, which POSIX makes atomic. A reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync (safetensors' own writer is bypassed so a full disk is a plain OSError)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` over ``path``; the temporary file is
    removed when ``write`` fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: write_file(tmp, data))


def atomic_text(path: Path, text: str) -> None:
    atomic_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    """JSON written atomically: a kill mid-write must not leave a half file that reads as done."""
    atomic_text(path, json.dumps(data, indent=1))


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def recover_dir(final: Path) -> None:
    """A kill between ``atomic_dir``'s two renames leaves ``final`` missing: put the old one back."""
    old = final.parent / f".{final.name}-old"
    if old.is_dir() and not final.exists():
        old.rename(final)


def atomic_dir(final: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_dir)`` then swap ``tmp_dir`` into ``final`` with renames only."""
    final = Path(final)
    tmp = final.parent / f".{final.name}-tmp"
    old = final.parent / f".{final.name}-old"
    recover_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: give the space back
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
