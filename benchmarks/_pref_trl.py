"""TRL's side of ``benchmarks/preference.py``: DPOTrainer or KTOTrainer in a child process.

Both trainers get what chattune gets: SmolLM2 (or ``--model``) loaded from chattune's
resolved path in float32 weights, LoRA r=8, alpha=16, dropout 0.05 on the model's default
targets (dropout switched off by the trainer, as chattune does for preference objectives),
beta 0.1, the same learning rate and cosine schedule without warmup, ``steps`` optimiser
steps of the same rows in file order, bf16 autocast only where the CPU has bf16 instructions.
Gradient checkpointing is off (KTOConfig turns it on by default; chattune does not use it).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
LR, BETA = 5e-5, 0.1
sys.path.insert(0, str(REPO / "src"))


def _model_and_lora(spec: dict):
    import torch
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chattune.models.loading import default_targets, resolve

    path = resolve(spec["model"])
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    kind = model.config.model_type
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=default_targets(kind), fan_in_fan_out=kind == "gpt2")
    return tok, model, lora


def _shared_args(spec: dict) -> dict:
    import torch

    from chattune.models.loading import autocast_dtype

    return dict(output_dir=str(Path(spec["work"]) / "trl"), max_steps=spec["steps"], beta=BETA,
                per_device_train_batch_size=spec["rows_per_step"], learning_rate=LR, lr_scheduler_type="cosine",
                warmup_steps=0, bf16=autocast_dtype("auto", torch.device("cpu")) is not None,
                use_cpu=not torch.cuda.is_available(), logging_steps=1, report_to=[], save_strategy="no",
                gradient_checkpointing=False, max_length=spec["max_length"],
                precompute_ref_log_probs=spec["trl_precompute"], dataloader_num_workers=0, seed=0)


def _timed_train(trainer_cls, count_tokens, **kw) -> dict:
    """Train with a clock on every optimiser step; per-step tokens from ``count_tokens(inputs)``."""
    from transformers import TrainerCallback

    log = {"tokens": [], "ends": [], "t0": None}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            log["t0"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            log["ends"].append(time.perf_counter())

    class Timed(trainer_cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            log["tokens"].append(count_tokens(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = Timed(callbacks=[Clock()], **kw)
    t_ref = time.perf_counter()
    trainer.train()
    starts = [log["t0"]] + log["ends"][:-1]
    return {"tokens": log["tokens"], "seconds": [b - a for a, b in zip(starts, log["ends"])],
            "reference_seconds": 0.0, "setup_to_end_s": time.perf_counter() - t_ref,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_trl_dpo(spec: dict) -> dict:
    """DPOTrainer on the pairs; its reference is the adapter switched off unless ``trl_precompute``."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from chattune.data.render import SEED_ASSISTANT, SEED_USER

    tok, model, lora = _model_and_lora(spec)
    rows = [{"prompt": f"{SEED_USER}{p['prompt']}{SEED_ASSISTANT}", "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in map(json.loads, Path(spec["rows"]).read_text().splitlines())]
    return _timed_train(DPOTrainer, lambda inputs: int(inputs["attention_mask"].sum()),  # chosen + rejected rows
                        model=model, args=DPOConfig(**_shared_args(spec)),
                        train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora)


def run_trl_kto(spec: dict) -> dict:
    """KTOTrainer on the unpaired rows, in file order (its default sequential sampler).

    TRL pairs each answer with the previous one in its batch for the KL estimate z0; the rows
    of one step are its pairs' chosen answers then their rejected ones, so every such partner
    answers another prompt, as chattune's mismatched partners do. Tokens per step count the
    answers' rows and the KL rows (TRL scores both; chattune's second segment is the same)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from chattune.data.render import SEED_ASSISTANT, SEED_USER

    tok, model, lora = _model_and_lora(spec)
    rows = [{"prompt": f"{SEED_USER}{r['prompt']}{SEED_ASSISTANT}", "completion": r["completion"], "label": r["label"]}
            for r in map(json.loads, Path(spec["rows"]).read_text().splitlines())]
    args = KTOConfig(**_shared_args(spec), desirable_weight=1.0, undesirable_weight=1.0)

    def count(inputs) -> int:  # the answers' rows and the KL rows, no padding
        return int(inputs["attention_mask"].sum() + inputs["KL_attention_mask"].sum())

    return _timed_train(KTOTrainer, count, model=model, args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tok, peft_config=lora)
