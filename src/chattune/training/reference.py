"""Reference log-probs for preference training: one no-grad pass of the starting policy.

DPO and IPO compare the policy with a reference. Here the reference is the model as
training starts (the method applied, nothing trained yet; with ``--init-from`` the
earlier run), evaluated once before the first step and stored in the run directory as
``reference_logps.safetensors``. So every method, full fine-tuning included, has a
reference without a second model in memory or a second forward per step, and prompt and
prefix tuning, whose disabled adapter is *not* their starting policy, get the right one:
at step 0 every DPO margin is 0 and the loss ln 2 (tests/test_preference.py).

The file is keyed by the model, the method and its settings, the seed, the precision and
the tokenised pairs; a resumed run reads it back instead of recomputing it, and must,
since its model is no longer the starting policy. The validation and test splits are
always included: ``chattune eval`` ranks held-out pairs by the reference's own likelihood.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chattune.data import batch_plan
from chattune.files import atomic_write
from chattune.training.passes import passes

FILE = "reference_logps.safetensors"


def reference_key(cfg, splits: dict[str, list[dict]]) -> str:
    h = hashlib.sha256()
    what = {"model": dataclasses.asdict(cfg.model), "method": cfg.method.name,
            "settings": dataclasses.asdict(cfg.method.settings()), "seed": cfg.train.seed,
            "precision": cfg.train.precision, "template": cfg.data.template}
    h.update(json.dumps(what, sort_keys=True, default=str).encode())
    for name in sorted(splits):
        for s in splits[name]:
            h.update(json.dumps([name, s["id"], s["input_ids"], s["segments"]]).encode())
    return h.hexdigest()


def load_reference(run_dir: Path, key: str | None = None) -> dict[str, torch.Tensor] | None:
    """The stored (n, 2) log-probs per split, or None when absent or computed for other data."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    with safe_open(path, "pt") as f:
        if key is not None and (f.metadata() or {}).get("key") != key:
            return None
        return {name: f.get_tensor(name) for name in f.keys()}


@torch.no_grad()
def reference_logps(model, objective, samples: list[dict], pad_id: int, batch_size: int, device, dtype=None,
                    packing: bool = False, flat: bool = False, max_length: int = 1024,
                    check: Callable[[], None] | None = None) -> torch.Tensor:
    """Summed (chosen, rejected) answer log-probs (n, 2) of ``samples`` under ``model``, in the
    batch layout training uses (packed where the method packs). ``check()`` runs before each
    batch (training passes its interrupt check: the pass can take many minutes)."""
    out = torch.zeros(len(samples), 2, dtype=torch.float32)
    lengths = [len(s["input_ids"]) for s in samples]
    plan = batch_plan(lengths, batch_size, packing=packing, max_length=2 * max_length, seed=0, epoch=0, shuffle=False)

    def batches():
        for mb in plan:
            if check is not None:
                check()
            yield objective.collate([samples[i] for i in mb], pad_id, packing=packing, bins=mb.bins,
                                    mask_dtype=dtype or torch.float32, flat=flat)

    for mb, (logps, _) in zip(plan, passes(model, batches(), device, dtype, objective.logps)):
        out[torch.tensor(list(mb))] = logps.float().cpu()
    return out


@dataclass
class Layout:
    """How the run batches pairs, so the reference pass sees them as training will."""

    pad_id: int
    batch_size: int
    dtype: torch.dtype | None
    packing: bool
    flat: bool
    max_length: int


def attach_reference(model, objective, cfg, splits: dict[str, list[dict]], run_dir: Path, layout: Layout, acc,
                     check: Callable[[], None], log: Callable[[dict], None]) -> None:
    """Give every pair of ``splits`` its ``"ref"`` log-probs: read from ``run_dir``, or computed
    now with the (not yet trained) ``model`` and stored there. ``check()`` runs before each
    batch: the run's interrupt check, so a first SIGINT/SIGTERM during the pass stops it at the
    next batch with a checkpoint of step 0 (the starting policy), and ``--resume`` computes the
    reference again from the same weights. ``acc`` is the run's Accelerator (device, main
    process, barrier)."""
    # SimPO and ORPO train without a reference; eval still ranks held-out pairs by it
    names = [n for n in ("train", "validation", "test") if splits[n] and (n != "train" or objective.needs_reference)]
    key = reference_key(cfg, {n: splits[n] for n in names})
    stored = load_reference(run_dir, key)
    if stored is None:
        t0 = time.perf_counter()
        stored = {n: reference_logps(model, objective, splits[n], layout.pad_id, layout.batch_size, acc.device,
                                     layout.dtype, layout.packing, layout.flat, layout.max_length, check=check)
                  for n in names}
        if acc.is_main_process:
            tensors = {n: t.contiguous() for n, t in stored.items()}
            atomic_write(run_dir / FILE, lambda tmp: save_file(tensors, tmp, metadata={"key": key}))
        acc.wait_for_everyone()
        log({"step": 0, "reference_seconds": time.perf_counter() - t0,
             "reference_pairs": sum(len(splits[n]) for n in names)})
    for n in names:
        for s, ref in zip(splits[n], stored[n].tolist()):
            s["ref"] = ref
