"""Full fine-tuning: every weight trains. The baseline the PEFT methods are measured against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM

from chattune.methods.method import Method, register


@dataclass
class FullSettings:
    """Full fine-tuning has no settings of its own (learning rate etc. live in `train`)."""


def apply_full(model, cfg: FullSettings, tokenizer=None):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_full(model, directory: Path, state_dict: dict | None = None) -> None:
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)


def load_full(base, directory: Path):
    # The saved directory is a whole model; the base only tells the dtype to use.
    return AutoModelForCausalLM.from_pretrained(directory, dtype=base.dtype, use_safetensors=True)


register(Method(name="full", config_cls=FullSettings, apply=apply_full, save=save_full, load=load_full,
                disable=None, merge=lambda m: m, supports_packing=True,
                description="every weight trains (the baseline; most memory)"))
