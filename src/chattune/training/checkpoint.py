"""Atomic, safetensors-only checkpoints of everything a resumed run needs; the last two are kept.

``run_dir/checkpoint/`` holds the trainable weights, the AdamW state, the RNG states and
the data position; ``run_dir/checkpoint-previous/`` the one before it. A checkpoint is
written into ``.checkpoint-tmp`` (every file fsynced, ``state.json`` last and by a rename, so a directory
without it is incomplete), then the newest becomes the previous and the new one the
newest, by renames only: a kill at any moment leaves at least one complete checkpoint
(tests/test_interrupts.py kills a run at every write and rename).
Optimiser state is flattened into safetensors (tensors) plus JSON (hyper-parameters)
rather than pickled, so loading a checkpoint never executes code.

Loading reads and checks every file (names and shapes against the model and the
optimiser) before it changes anything, so a truncated, corrupted or foreign checkpoint
is reported as ``CheckpointError`` naming the file, and the caller can fall back.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from chattune.errors import UserError
from chattune.files import recover_dir, write_file
from chattune.training.shard import local_like

CHECKPOINT = "checkpoint"
PREVIOUS = "checkpoint-previous"
_TMP = ".checkpoint-tmp"
_LEGACY = ".checkpoint-old"  # written by earlier versions between their two renames


class CheckpointError(UserError):
    """A checkpoint that cannot be used; ``path`` is the file (or directory) at fault."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path


# -- writing ----------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """``state.json`` goes first, so a directory half removed by a kill reads as incomplete."""
    (path / "state.json").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    scalars: dict = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], optimizer_state: dict, scheduler,
                    state: dict) -> None:
    """Write a new ``run_dir/checkpoint``; the one it replaces becomes ``checkpoint-previous``.

    ``weights`` are the full trainable parameters by name and ``optimizer_state`` the AdamW
    ``state_dict()`` with full tensors (``training/shard.py`` gathers both when the model is
    sharded), ``state`` is JSON-able bookkeeping. Raises OSError (full disk, read-only file system)
    with the tmp directory removed and both kept checkpoints untouched."""
    tmp = run_dir / _TMP
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_file(tmp / "trainable.safetensors", save_bytes(weights))
        tensors, meta = _optimizer_tensors(optimizer_state)
        write_file(tmp / "optimizer.safetensors", save_bytes(tensors))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        write_file(tmp / "rng.safetensors", save_bytes(rng))
        full = dict(state, optimizer=meta, scheduler=scheduler.state_dict(),
                    python_rng=_jsonable(random.getstate()), numpy_rng=_jsonable(np.random.get_state()))
        # state.json marks the checkpoint complete, so it must never exist torn: written aside, then renamed
        write_file(tmp / "state.json.part", json.dumps(full).encode())
        os.replace(tmp / "state.json.part", tmp / "state.json")
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    newest, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    if (newest / "state.json").is_file():
        _remove(previous)
        newest.rename(previous)
    else:
        _remove(newest)  # an incomplete leftover (or one moved aside as bad): nothing to keep
    tmp.rename(newest)
    _fsync_dir(run_dir)


# -- finding and loading ------------------------------------------------------------------
def settle(run_dir: Path) -> None:
    """Finish what a kill interrupted: a complete ``.checkpoint-tmp`` (killed between the two
    renames) or an earlier version's ``.checkpoint-old`` becomes the newest checkpoint; an
    adapter directory caught between its renames is put back."""
    recover_dir(run_dir / "adapter")
    newest = run_dir / CHECKPOINT
    for leftover in (run_dir / _TMP, run_dir / _LEGACY):
        if not leftover.exists():
            continue
        if (leftover / "state.json").is_file() and not (newest / "state.json").is_file():
            _remove(newest)
            leftover.rename(newest)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def candidates(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoints, newest first (a kill can leave the newest in the tmp dir)."""
    found = []
    for name in (CHECKPOINT, _TMP, _LEGACY, PREVIOUS):
        if (run_dir / name / "state.json").is_file():
            found.append(run_dir / name)
    return found


def find_checkpoint(run_dir: Path) -> Path | None:
    found = candidates(run_dir)
    return found[0] if found else None


def set_aside(ckpt: Path) -> Path:
    """Move a checkpoint that failed to load out of the rotation (kept for inspection)."""
    bad = ckpt.parent / f"{ckpt.name}.bad"
    shutil.rmtree(bad, ignore_errors=True)
    ckpt.rename(bad)
    return bad


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_bytes(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(path, f"cannot be read ({type(e).__name__}: {str(e)[:120]})") from None


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(path, f"cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
    needed = ("step", "optimizer", "scheduler", "python_rng", "numpy_rng")
    if not isinstance(state, dict) or not all(k in state for k in needed):
        raise CheckpointError(path, "is not a chattune checkpoint state (keys missing)")
    return state


def _check(ckpt: Path, weights: dict, tensors: dict, meta: dict, model, optimizer) -> None:
    """Names and shapes against the model and the optimiser, before either is touched."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    where = ckpt / "trainable.safetensors"
    if set(weights) != set(params):
        extra, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
        raise CheckpointError(where, f"does not match this model/method ({len(missing)} tensors missing, "
                                     f"{len(extra)} unexpected, e.g. {(missing or extra)[0]})")
    for name, p in params.items():
        if weights[name].shape != p.shape:
            raise CheckpointError(where, f"{name} has shape {tuple(weights[name].shape)}, the model {tuple(p.shape)}")
    order = [p for group in optimizer.param_groups for p in group["params"]]
    groups = meta.get("param_groups")
    where = ckpt / "optimizer.safetensors"
    if not isinstance(groups, list) or [len(g.get("params", ())) for g in groups] != \
            [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(where, "its parameter groups do not match this model's trainable parameters")
    for key, value in tensors.items():
        idx, _, name = key.partition(".")
        if not idx.isdigit() or int(idx) >= len(order):
            raise CheckpointError(where, f"unexpected tensor {key}")
        if value.dim() and value.shape != order[int(idx)].shape:
            raise CheckpointError(where, f"{key} has shape {tuple(value.shape)}, the parameter "
                                         f"{tuple(order[int(idx)].shape)}")


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimiser, scheduler and RNG states; return the bookkeeping.

    Raises CheckpointError (nothing restored) when a file is missing, unreadable or does
    not fit the model."""
    state = _read_state(ckpt / "state.json")
    weights = _read_tensors(ckpt / "trainable.safetensors")
    tensors = _read_tensors(ckpt / "optimizer.safetensors")
    rng = _read_tensors(ckpt / "rng.safetensors")
    meta = state.pop("optimizer")
    _check(ckpt, weights, tensors, meta if isinstance(meta, dict) else {}, model, optimizer)
    try:
        order = [p for group in optimizer.param_groups for p in group["params"]]
        python_rng, np_state = _tuples(state.pop("python_rng")), state.pop("numpy_rng")
        np_rng = (np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:])
        opt_state: dict = {}
        for key, value in list(tensors.items()) + list(meta["scalars"].items()):
            idx, name = key.split(".", 1)
            if torch.is_tensor(value) and value.dim():  # a sharded run keeps its shard of the full state
                value = local_like(value, order[int(idx)])
            opt_state.setdefault(int(idx), {})[name] = value
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(local_like(value, params[name]))
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        scheduler.load_state_dict(state.pop("scheduler"))
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")])
        random.setstate(python_rng)
        np.random.set_state(np_rng)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(ckpt / "state.json", f"inconsistent ({type(e).__name__}: {str(e)[:120]})") from None
    return state


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
