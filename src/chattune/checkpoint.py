"""Atomic, safetensors-only checkpoints of everything a resumed run needs.

``run_dir/checkpoint/`` holds the trainable weights, the AdamW state, the RNG states and
the data position. It is written to a temporary directory and renamed into place, so a
kill at any moment leaves either the previous or the new checkpoint, never a torn one.
Optimiser state is flattened into safetensors (tensors) plus JSON (hyper-parameters)
rather than pickled, so loading a checkpoint never executes code.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from chattune.errors import UserError

CHECKPOINT = "checkpoint"
_OLD = ".checkpoint-old"


def atomic_dir(final: Path, write) -> None:
    """Call ``write(tmp_dir)`` then swap ``tmp_dir`` into ``final`` with renames only."""
    tmp = final.parent / f".{final.name}-tmp"
    old = final.parent / f".{final.name}-old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    scalars: dict = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict) -> None:
    """Write ``run_dir/checkpoint`` atomically. ``state`` is JSON-able bookkeeping."""

    def write(tmp: Path) -> None:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, tmp / "rng.safetensors")
        full = dict(state, optimizer=meta, scheduler=scheduler.state_dict(),
                    python_rng=_jsonable(random.getstate()), numpy_rng=_jsonable(np.random.get_state()))
        (tmp / "state.json").write_text(json.dumps(full))

    atomic_dir(run_dir / CHECKPOINT, write)


def find_checkpoint(run_dir: Path) -> Path | None:
    for name in (CHECKPOINT, _OLD):  # `.checkpoint-old` survives a kill between the two renames
        if (run_dir / name / "state.json").is_file():
            return run_dir / name
    return None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimiser, scheduler and RNG states; return the bookkeeping."""
    state = json.loads((ckpt / "state.json").read_text())
    weights = load_file(ckpt / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = set(weights) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise UserError(f"{ckpt} does not match this model/method ({len(missing)} tensors differ)")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    tensors = load_file(ckpt / "optimizer.safetensors")
    meta = state.pop("optimizer")
    opt_state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = load_file(ckpt / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")])
    random.setstate(_tuples(state.pop("python_rng")))
    np_state = state.pop("numpy_rng")
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return state


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
