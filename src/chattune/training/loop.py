"""The training loop: HF Accelerate underneath, so ``accelerate launch`` runs the same
command on several processes or GPUs.

Why a loop of our own rather than ``transformers.Trainer``: the loss is averaged over
all loss-bearing tokens of the whole accumulated batch (across processes too), not as
a mean of micro-batch means, and the micro-batch plan is computed identically on every
process, so N processes with accumulation k take exactly the steps of 1 process with
accumulation N*k. Checkpoints are atomic and carry the exact data position.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from chattune.models import attention
from chattune import __version__
from chattune.training import reference, resume, rundir
from chattune.training import runguard, shard
from chattune.training import checkpoint as ckpt
from chattune.config import save_yaml
from chattune.data import batch_plan
from chattune.errors import UserError
from chattune.files import atomic_dir, atomic_text
from chattune.training.init_from import load_start_model
from chattune.training.loss import unwrap
from chattune.methods import count_parameters, get_method
from chattune.models.loading import autocast_dtype, load_tokenizer
from chattune.training.neftune import add_neftune
from chattune.training.objectives import MetricWindow, get_objective
from chattune.training.passes import autocast, to_device
from chattune.training.settings import RunConfig


def store_frozen_weights_in(model, dtype: torch.dtype) -> int:
    """Store frozen weights that only enter matrix products (``nn.Linear``, GPT-2's ``Conv1D``)
    in the autocast dtype; returns how many. Autocast casts them to ``dtype`` at every use
    anyway, and caches casts only for weights that require grad, so a frozen fp32 weight is
    re-cast in every forward (benchmarks/levers.py measures the cost). Stored in
    ``dtype``, the arithmetic is the same and the casts are gone. A frozen LM head tied to
    the input embedding gets its own copy in ``dtype`` (the embedding lookup is not
    autocast, so the shared weight stays as it is); DoRA's base weights are left alone
    (their norm is computed outside the matmul)."""
    from transformers.pytorch_utils import Conv1D

    keep = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = unwrap(model).get_output_embeddings()
    n = 0
    if isinstance(head, torch.nn.Linear) and id(head.weight) in keep and not head.weight.requires_grad:
        # (V, C): +V*C*2 bytes, instead of a (V, C) cast at every step
        head.weight = torch.nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)
        n += 1
    for m in model.modules():
        if any(getattr(m, "use_dora", {}).values()):
            keep.add(id(m.get_base_layer().weight))
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (torch.nn.Linear, Conv1D)) and not w.requires_grad and id(w) not in keep and w.dtype != dtype:
            m.weight.data = w.data.to(dtype)
            n += 1
    return n


def build_model(cfg: RunConfig, tokenizer, attn_implementation: str | None = None):
    method = get_method(cfg.method.name)
    model = load_start_model(cfg.model, attn_implementation or cfg.model.attn_implementation)
    model = method.apply(model, cfg.method.settings(), tokenizer)
    add_neftune(model, cfg.train.neftune_alpha)  # embedding noise in train mode only
    return model, method


VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")  # read cu_seq_lens natively


def packed_attention(cfg: RunConfig, packing: bool) -> tuple[str, bool]:
    """The attention implementation to load and whether packed rows go flat (``collate(flat=True)``)."""
    attn, layout = cfg.model.attn_implementation, cfg.train.packed_layout
    flat_ok = attn == "sdpa" or attn in VARLEN_KERNELS
    if layout == "flat" and not flat_ok:
        raise UserError(f"train.packed_layout=flat needs model.attn_implementation sdpa or flash_attention_2/3, "
                        f"not {attn}; use train.packed_layout=mask")
    flat = packing and flat_ok and layout != "mask"
    return (attention.NAME if flat and attn == "sdpa" else attn), flat


def check_positions(cfg: RunConfig, model) -> None:
    """Virtual tokens (prompt/prefix tuning) take positions too: they must fit the model."""
    limit = getattr(model.config, "max_position_embeddings", None)
    virtual = getattr(cfg.method.settings(), "num_virtual_tokens", 0)
    if limit and cfg.data.max_length + virtual > limit:
        extra = f" + {virtual} virtual tokens" if virtual else ""
        raise UserError(f"--max-length {cfg.data.max_length}{extra} exceeds the model's {limit} positions; "
                        f"use --max-length {limit - virtual}")


def resolve_packing(cfg: RunConfig, method) -> bool:
    if cfg.train.packing is None:
        return method.supports_packing
    if cfg.train.packing and not method.supports_packing:
        raise UserError(f"--packing is not supported with method '{method.name}': its virtual tokens would "
                        f"attend across packed conversations; drop --packing")
    return cfg.train.packing


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Plan:
    """Optimiser steps as groups of micro-batches; identical on every process."""

    samples: list
    batch_size: int
    packing: bool
    max_length: int
    seed: int
    group: int  # micro-batches per optimiser step over all processes

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        lengths = [len(s["input_ids"]) for s in self.samples]
        mbs = batch_plan(lengths, self.batch_size, packing=self.packing, max_length=self.max_length,
                         seed=self.seed, epoch=epoch)
        return [mbs[i:i + self.group] for i in range(0, len(mbs), self.group)]


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False):
        self.cfg, self.run_dir, self.resume = cfg, run_dir, resume
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), dynamo_backend="inductor" if cfg.train.compile else "no")
        set_seed(cfg.train.seed)
        self.tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
        self.objective = get_objective(cfg.train)  # the loss: sft, or a preference objective over pairs
        self.data = self.objective.prepare(cfg.data, self.tokenizer)
        if not self.data.splits["train"]:
            raise UserError("no training samples left after selection; see `chattune data` for the drop reasons")
        self.packing = resolve_packing(cfg, get_method(cfg.method.name))
        attn, self.flat = packed_attention(cfg, self.packing)
        model, self.method = build_model(cfg, self.tokenizer, attn)
        check_positions(cfg, model)
        self.trainable, self.total = count_parameters(model)
        self.dtype = autocast_dtype(cfg.train.precision, self.acc.device)
        if self.dtype is not None:
            store_frozen_weights_in(model, self.dtype)
        self.sharded = shard.enabled(cfg.train.shard, self.acc)
        if self.sharded:  # FSDP2 in place of DDP; before the optimiser, which must hold the shards
            shard.check(cfg.method.name, self.acc)
            model = shard.shard_model(model, self.acc)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.model = model if self.sharded else self.acc.prepare(model)
        self.plan = Plan(self.data.splits["train"], cfg.train.batch_size, self.packing,
                         cfg.data.max_length * self.objective.segments, cfg.train.seed,
                         self.acc.num_processes * cfg.train.grad_accum)
        self.metric_window = MetricWindow(self.objective.metrics)
        self.steps_per_epoch = len(self.plan.epoch(0))
        t = cfg.train
        self.total_steps = (self.steps_for_tokens(t.max_tokens) if t.max_tokens else
                            t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch)))
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(t.warmup_ratio * self.total_steps), self.total_steps)
        self.state = {"step": 0, "best_val": None, "bad_evals": 0, "tokens": 0, "loss_tokens": 0, "train_s": 0.0,
                      "last_loss": None}
        self.saved_step, self.interrupts = None, None

    def steps_for_tokens(self, budget: int) -> int:
        """Optimiser steps until ``budget`` conversation tokens have been seen."""
        seen, steps, epoch = 0, 0, 0
        lengths = [len(s["input_ids"]) for s in self.plan.samples]
        while True:
            for group in self.plan.epoch(epoch):
                seen += sum(lengths[i] for mb in group for i in mb)
                steps += 1
                if seen >= budget:
                    return steps
            epoch += 1

    # -- bookkeeping ---------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.acc.is_main_process:
            try:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                kept = ckpt.find_checkpoint(self.run_dir)
                raise runguard.write_error(e, self.run_dir / "metrics.jsonl", kept) from None
            if self.tb is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.tb.add_scalar(k, v, record["step"])

    def save(self) -> None:
        unwrapped = self.acc.unwrap_model(self.model)
        if self.sharded or self.acc.is_main_process:  # sharded: gathering is a collective, all take part
            keep = self.acc.is_main_process  # and only the writer keeps the full tensors
            state = shard.saved_state(unwrapped, keep) if self.sharded else None
            weights = shard.trainable_weights(unwrapped, state, keep)
            optim = shard.optimizer_state(self.optimizer, keep)
        if self.acc.is_main_process:
            target = rundir.adapter_dir(self.run_dir)
            try:  # a full disk ends in one line; the atomic writes keep what was there
                atomic_dir(target, lambda d: self.method.save(unwrapped, d, state))
                target = self.run_dir / ckpt.CHECKPOINT
                ckpt.save_checkpoint(self.run_dir, weights, optim, self.scheduler, self.state)
            except (OSError, ckpt.SafetensorError) as e:
                raise runguard.write_error(e, target, ckpt.find_checkpoint(self.run_dir)) from None
        self.saved_step = self.state["step"]
        self.acc.wait_for_everyone()

    def start(self) -> None:
        self.tb = None
        if not self.resume and (self.run_dir / rundir.CONFIG).exists():
            raise UserError(f"{self.run_dir} already holds a run: continue it with --resume {self.run_dir} "
                            f"or pick another --output-dir")
        self.acc.wait_for_everyone()  # every process has checked before the main one writes
        held = self.acc.gather(torch.tensor([shard.local_numel(self.model)], device=self.acc.device))
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_yaml(self.cfg, self.run_dir / rundir.CONFIG)
            self.tokenizer.save_pretrained(rundir.tokenizer_dir(self.run_dir))
            info = {"chattune_version": __version__, "method": self.method.name, "trainable_params": self.trainable, "total_params": self.total,
                    "trainable_share": self.trainable / self.total, "packing": self.packing,
                    "precision": str(self.dtype).replace("torch.", "") if self.dtype else "float32",
                    "processes": self.acc.num_processes, "total_steps": self.total_steps,
                    "shard": "fsdp" if self.sharded else "none", "params_per_process": held.tolist(),
                    "data": self.data.stats()}
            atomic_text(self.run_dir / rundir.INFO, json.dumps(info, indent=1))
            print(f"{self.method.name}: {self.trainable:,} trainable parameters of {self.total:,} "
                  f"({100 * self.trainable / self.total:.3f}%)", flush=True)
            if self.cfg.train.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise UserError("train.tensorboard needs the tensorboard package: pip install 'chattune[tensorboard]'") from None
                self.tb = SummaryWriter(self.run_dir / "tb")
        # preferences: reference log-probs of the starting policy, before any resume
        self.objective.start(self.model, self.attach_reference)
        if self.resume:
            state = resume.resume_from_checkpoint(self.run_dir, self.acc.unwrap_model(self.model), self.optimizer,
                                                  self.scheduler, self.acc, self.total_steps)
            if state is not None:
                self.state, self.saved_step = {**self.state, **state}, state["step"]

    def attach_reference(self) -> None:
        cfg = self.cfg
        layout = reference.Layout(self.tokenizer.pad_token_id, cfg.train.batch_size, self.dtype, self.packing,
                                  self.flat, cfg.data.max_length)
        reference.attach_reference(self.acc.unwrap_model(self.model), self.objective, cfg, self.data.splits,
                                   self.run_dir, layout, self.acc, self.stop_if_interrupted, self.log)

    def stop_if_interrupted(self) -> None:
        """At a step boundary, after a signal: checkpoint this step (once) and raise Interrupted."""
        signum = runguard.interrupt_signal(self.interrupts, self.acc)
        if signum is None:
            return
        if self.saved_step != self.state["step"]:
            self.save()
        raise runguard.Interrupted(self.state["step"], signum, self.run_dir)

    # -- one optimiser step ---------------------------------------------------------
    def step(self, group: list[list[int]]) -> tuple[float, int, int]:
        """Forward/backward over this process's share of ``group``, then one AdamW step."""
        samples = self.plan.samples
        mask_dtype = self.dtype or torch.float32  # sdpa wants the additive mask in the compute dtype
        batches = [self.objective.collate([samples[i] for i in mb], self.tokenizer.pad_token_id, packing=self.packing,
                                          bins=mb.bins, mask_dtype=mask_dtype, flat=self.flat) for mb in group]
        # Normaliser: loss units (tokens for SFT, pairs for preferences) of the whole accumulated
        # batch over all processes, which every process knows from the shared plan: no all-reduce needed.
        n_group = sum(self.objective.units(b) for b in batches)
        rank, world = self.acc.process_index, self.acc.num_processes
        mine = batches[rank::world]
        # conversation tokens, padding excluded, counted once (on this process's share)
        tokens = sum(len(samples[i]["input_ids"]) for mb in group[rank::world] for i in mb) if mine else 0
        scale = world / n_group  # DDP averages gradients over processes; undo that
        if not mine:  # a short final group: keep DDP's collective in step with a zero-loss pass
            mine, scale = batches[:1], 0.0
        loss_sum, metric_sums = 0.0, torch.zeros(len(self.objective.metrics), dtype=torch.float64)
        self.model.train()
        for i, batch in enumerate(mine):
            batch = to_device(batch, self.acc.device)
            sync = self.acc.no_sync(self.model) if i < len(mine) - 1 else contextlib.nullcontext()
            with sync, autocast(self.acc.device, self.dtype):
                loss, metrics = self.objective.loss(self.model, batch, full_logits=self.cfg.train.loss_logits == "full")
                self.acc.backward(loss * scale)
            loss_sum += float(loss.detach()) if scale else 0.0
            metric_sums += metrics if scale else 0.0
        stats = torch.tensor([loss_sum, tokens, *metric_sums.tolist()], dtype=torch.float64, device=self.acc.device)
        stats = self.acc.reduce(stats, reduction="sum")
        self.metric_window.add(stats[2:], n_group)
        if not math.isfinite(float(stats[0])):
            raise UserError(f"loss became {float(stats[0])} at step {self.state['step'] + 1}; stopped. The last good "
                            f"checkpoint is in {self.run_dir / 'checkpoint'} (resume with a lower --lr)")
        if self.cfg.train.max_grad_norm > 0:
            norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
            grad_norm = float(shard.full(norm))  # sharded: a DTensor
        else:
            grad_norm = float("nan")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_grad_norm = grad_norm
        return float(stats[0]) / n_group, int(stats[1]), n_group

    # -- evaluation -------------------------------------------------------------------
    def validate(self) -> float | None:
        val = self.data.splits["validation"][: self.cfg.train.max_eval_samples]
        if not val:
            return None
        result = None
        if self.acc.is_main_process or self.sharded:  # sharded: every forward needs every process
            result = self.objective.validate(self.acc.unwrap_model(self.model), val, self.tokenizer.pad_token_id,
                                             self.cfg.eval.batch_size, self.acc.device, self.dtype)
        self.acc.wait_for_everyone()
        value = torch.tensor([(result or 0.0) if self.acc.is_main_process else 0.0], device=self.acc.device)
        return float(self.acc.reduce(value, reduction="sum"))

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> dict:
        self.start()
        step = self.state["step"]
        bar = tqdm(total=self.total_steps, initial=step, desc="train",
                   disable=not self.acc.is_main_process or step >= self.total_steps, dynamic_ncols=True)
        last_loss, stopped_early = None, False
        try:
            last_loss, stopped_early = self._loop(bar, step)
        finally:
            bar.close()  # before any error message, so it starts on its own line
        return self.finish(last_loss, stopped_early)

    def _loop(self, bar, step: int) -> tuple[float | None, bool]:
        t = self.cfg.train
        window = {"loss": 0.0, "n": 0, "tokens": 0, "steps": 0, "step_s": 0.0}
        epoch_cache: dict[int, list] = {}
        last_loss, stopped_early = None, False
        while step < self.total_steps:
            self.stop_if_interrupted()
            epoch, pos = divmod(step, self.steps_per_epoch)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: self.plan.epoch(epoch)}
            t0 = time.perf_counter()
            loss, tokens, loss_tokens = self.step(epoch_cache[epoch][pos])
            dt = time.perf_counter() - t0
            self.state["train_s"] += dt
            step += 1
            self.state["step"] = step
            self.state["tokens"] += tokens
            self.state["loss_tokens"] += loss_tokens
            window["loss"] += loss * loss_tokens
            window["n"] += loss_tokens
            window["tokens"] += tokens
            window["steps"] += 1
            window["step_s"] += dt
            last_loss = self.state["last_loss"] = loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{window['tokens'] / max(window['step_s'], 1e-9):.0f}")
            if step % t.log_every == 0 or step == self.total_steps:
                self.log({"step": step, "epoch": round(step / self.steps_per_epoch, 4),
                          "loss": window["loss"] / max(window["n"], 1), "lr": self.scheduler.get_last_lr()[0],
                          "grad_norm": self.last_grad_norm, "tokens_per_s": window["tokens"] / max(window["step_s"], 1e-9),
                          "step_seconds": window["step_s"] / window["steps"],
                          "tokens": self.state["tokens"], "loss_tokens": self.state["loss_tokens"],
                          **self.metric_window.pop()})
                window = {"loss": 0.0, "n": 0, "tokens": 0, "steps": 0, "step_s": 0.0}
            if (t.eval_every and step % t.eval_every == 0) or step == self.total_steps:
                stopped_early = self.evaluate_and_maybe_stop(step)
            if step % t.save_every == 0 or step == self.total_steps or stopped_early:
                self.save()
            if stopped_early:
                break
        return last_loss, stopped_early

    def evaluate_and_maybe_stop(self, step: int) -> bool:
        val = self.validate()
        if val is None:
            return False
        self.log({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50))})
        best = self.state["best_val"]
        if best is None or val < best:
            self.state["best_val"], self.state["bad_evals"] = val, 0
        else:
            self.state["bad_evals"] += 1
        patience = self.cfg.train.early_stopping_patience
        return bool(patience) and self.state["bad_evals"] >= patience

    def finish(self, last_loss: float | None, stopped_early: bool) -> dict:
        summary = {"steps": self.state["step"], "final_train_loss": self.state.get("last_loss"),
                   "best_val_loss": self.state["best_val"], "train_seconds": self.state["train_s"],
                   "tokens": self.state["tokens"], "loss_tokens": self.state["loss_tokens"],
                   "tokens_per_s": self.state["tokens"] / max(self.state["train_s"], 1e-9),
                   "peak_memory_mb": peak_memory_mb(self.acc.device), "stopped_early": stopped_early,
                   "trainable_params": self.trainable, "total_params": self.total}
        if self.acc.is_main_process:
            atomic_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self.acc.end_training()
        return summary


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Train one run into ``cfg.train.output_dir``; returns the summary written there.

    Raises ``runguard.Interrupted`` after a first SIGINT/SIGTERM (checkpoint written) and
    UserError when another live process holds the run directory."""
    run_dir = Path(cfg.train.output_dir)
    main = os.environ.get("RANK", "0") == "0"  # under `accelerate launch` the main process holds the lock
    with runguard.Interrupts() as interrupts, (runguard.RunLock(run_dir) if main else contextlib.nullcontext()):
        trainer = Trainer(cfg, run_dir, resume=resume)
        trainer.interrupts = interrupts
        return trainer.run()
