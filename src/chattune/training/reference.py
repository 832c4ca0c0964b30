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
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chattune.training import runguard
from chattune.data import batch_plan
from chattune.files import atomic_write

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
    from chattune.training.objectives import pair_logps

    model.eval()
    out = torch.zeros(len(samples), 2, dtype=torch.float32)
    lengths = [len(s["input_ids"]) for s in samples]
    plan = batch_plan(lengths, batch_size, packing=packing, max_length=2 * max_length, seed=0, epoch=0, shuffle=False)
    for mb in plan:
        if check is not None:
            check()
        batch = objective.collate([samples[i] for i in mb], pad_id, packing=packing, bins=mb.bins,
                                  mask_dtype=dtype or torch.float32, flat=flat)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logps, _ = pair_logps(model, batch)
        out[torch.tensor(list(mb))] = logps.float().cpu()
    return out


def attach_reference(trainer) -> None:
    """Give every pair of the run its ``"ref"`` log-probs: read from the run directory, or
    computed now with the (not yet trained) model and stored there. A first SIGINT/SIGTERM
    during the pass stops it at the next batch with a checkpoint of step 0 (the starting
    policy), so ``--resume`` computes the reference again from the same weights."""
    data, cfg = trainer.data.splits, trainer.cfg
    # SimPO and ORPO train without a reference; eval still ranks held-out pairs by it
    names = [n for n in ("train", "validation", "test") if data[n]
             and (n != "train" or trainer.objective.needs_reference)]
    key = reference_key(cfg, {n: data[n] for n in names})
    stored = load_reference(trainer.run_dir, key)
    if stored is None:
        t0 = time.perf_counter()
        model = trainer.acc.unwrap_model(trainer.model)
        stored = {n: reference_logps(model, trainer.objective, data[n], trainer.tokenizer.pad_token_id,
                                     cfg.train.batch_size, trainer.acc.device, trainer.dtype, trainer.packing,
                                     trainer.flat, cfg.data.max_length,
                                     check=lambda: runguard.stop_if_interrupted(trainer)) for n in names}
        if trainer.acc.is_main_process:
            tensors = {n: t.contiguous() for n, t in stored.items()}
            atomic_write(trainer.run_dir / FILE, lambda tmp: save_file(tensors, tmp, metadata={"key": key}))
        trainer.acc.wait_for_everyone()
        trainer.log({"step": 0, "reference_seconds": time.perf_counter() - t0,
                     "reference_pairs": sum(len(data[n]) for n in names)})
    for n in names:
        for s, ref in zip(data[n], stored[n].tolist()):
            s["ref"] = ref
