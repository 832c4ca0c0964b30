"""LoRA, DoRA, IA3, prompt tuning and prefix tuning, all through PEFT.

PEFT already does the hard parts (GPT-2's fused ``Conv1D`` with ``fan_in_fan_out``,
injecting virtual tokens, ``past_key_values`` for prefix tuning with the new cache
classes); this module only maps our config sections onto PEFT's configs and exposes
the registry surface. Saved adapters are PEFT's own format, so plain
``peft.PeftModel.from_pretrained(base, run_dir / "adapter")`` loads them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import (IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType,
                  get_peft_model)

from chattune.config import field
from chattune.errors import UserError
from chattune.methods.method import Method, register
from chattune.models.loading import default_targets


@dataclass
class LoraSettings:
    r: int = field(8, help="rank of the low-rank update")
    alpha: int = field(16, help="scaling numerator: the update is scaled by alpha / r")
    dropout: float = field(0.05, help="dropout on the LoRA input")
    target_modules: list[str] | None = field(None, help="module names to adapt; default per architecture "
                                             "(GPT-2: c_attn, Llama-style: q_proj,v_proj)")

    def __post_init__(self):
        if self.r < 1:
            raise UserError(f"method.lora.r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"method.lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class IA3Settings:
    target_modules: list[str] | None = field(None, help="modules whose activations are rescaled; default: PEFT's per-architecture list")
    feedforward_modules: list[str] | None = field(None, help="subset of target_modules rescaled on their input")


@dataclass
class PromptSettings:
    num_virtual_tokens: int = field(20, help="number of trainable soft-prompt embeddings prepended to the input")
    init_text: str | None = field("Answer the user's question helpfully.",
                                  help="initialise the soft prompt from this text's embeddings (None: random)")

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise UserError("method.prompt.num_virtual_tokens must be >= 1")


PREFIX_INIT_TEXT = "Answer the user's question helpfully."


@dataclass
class PrefixSettings:
    num_virtual_tokens: int = field(20, help="number of trainable key/value positions per layer")
    init_text: str | None = field(PREFIX_INIT_TEXT, help="initialise the prefix with the keys and values the base model "
                                  "computes for this text (Li & Liang 2021, sec. 7.2); None: PEFT's random init")
    prefix_projection: bool = field(False, help="reparameterise the prefix through a 2-layer MLP (Li & Liang 2021, sec. 4.3)")
    encoder_hidden_size: int = field(512, help="hidden size of the reparameterisation MLP")

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise UserError("method.prefix.num_virtual_tokens must be >= 1")
        if self.prefix_projection and self.init_text is not None:
            if self.init_text != PREFIX_INIT_TEXT:  # asked for explicitly: say it cannot be done
                raise UserError("method.prefix.init_text needs prefix_projection=false: the projection's MLP "
                                "outputs the prefix, so there is no key/value table to initialise")
            self.init_text = None


def _lora_config(model, cfg: LoraSettings, use_dora: bool) -> LoraConfig:
    model_type = model.config.model_type
    targets = cfg.target_modules or default_targets(model_type)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=targets, bias="none", use_dora=use_dora,
                      fan_in_fan_out=model_type == "gpt2")  # GPT-2 Conv1D stores weights (in, out)


def _wrap(model, peft_cfg):
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:  # e.g. target modules not found in the model
        raise UserError(f"cannot apply {peft_cfg.peft_type.value}: {str(e).splitlines()[0]}") from None


def apply_lora(model, cfg: LoraSettings, tokenizer=None):
    return _wrap(model, _lora_config(model, cfg, use_dora=False))


def apply_dora(model, cfg: LoraSettings, tokenizer=None):
    return _wrap(model, _lora_config(model, cfg, use_dora=True))


def apply_ia3(model, cfg: IA3Settings, tokenizer=None):
    kw = {}
    if cfg.target_modules:
        kw["target_modules"] = cfg.target_modules
        kw["feedforward_modules"] = cfg.feedforward_modules or []
    elif cfg.feedforward_modules:
        raise UserError("method.ia3.feedforward_modules needs method.ia3.target_modules")
    config = IA3Config(task_type=TaskType.CAUSAL_LM, fan_in_fan_out=model.config.model_type == "gpt2", **kw)
    return _wrap(model, config)


def _text_ids(tokenizer, text: str, n: int) -> list[int]:
    """``text``'s token ids repeated to exactly ``n`` (the virtual tokens an init text fills)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def apply_prompt(model, cfg: PromptSettings, tokenizer=None):
    peft_model = _wrap(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens))
    if cfg.init_text and tokenizer is not None:
        # PEFT's own TEXT init re-loads the tokenizer by name; we already hold it, so do
        # the same thing directly: repeat the text's token embeddings to fill the prompt.
        ids = _text_ids(tokenizer, cfg.init_text, cfg.num_virtual_tokens)
        embed = peft_model.get_input_embeddings()
        with torch.no_grad():
            init = embed(torch.tensor(ids, device=embed.weight.device)).detach().clone()
            peft_model.prompt_encoder["default"].embedding.weight.copy_(init)
    return peft_model


def apply_prefix(model, cfg: PrefixSettings, tokenizer=None):
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                                prefix_projection=cfg.prefix_projection, encoder_hidden_size=cfg.encoder_hidden_size)
    init = _text_keys_values(model, tokenizer, cfg.init_text, cfg.num_virtual_tokens) if cfg.init_text and tokenizer else None
    peft_model = _wrap(model, config)
    if init is not None:
        # PEFT's prefix table is (V, L * 2 * H * d), read as (V, L*2, H, d): key of layer l at
        # 2l, value at 2l + 1. A random table makes every layer attend to noise at step 0 (the
        # loss starts far above the base model's); real activations start where the base
        # model with the text in front of the conversation is.
        table = peft_model.prompt_encoder["default"].embedding.weight  # (V, L*2*H*d)
        with torch.no_grad():
            table.copy_(init.reshape(table.shape))
    return peft_model


@torch.no_grad()
def _text_keys_values(model, tokenizer, text: str, n: int) -> torch.Tensor:
    """The base model's keys and values for ``text`` repeated to ``n`` tokens: (n, L*2, H, d)."""
    ids = _text_ids(tokenizer, text, n)
    was_training = model.training
    model.eval()
    cache = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True).past_key_values
    model.train(was_training)
    per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # L x (2, H, n, d)
    return torch.stack(per_layer).flatten(0, 1).permute(2, 0, 1, 3).contiguous()  # (n, L*2, H, d)


def save_peft(model, directory: Path, state_dict: dict | None = None) -> None:
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)


def load_peft(base, directory: Path):
    return PeftModel.from_pretrained(base, directory, is_trainable=False)


def disable_peft(model):
    return model.disable_adapter()


@contextlib.contextmanager
def route_lora(model, adapters: list[str | None]):
    """One forward in which row i runs LoRA adapter ``adapters[i]`` (None: the base).

    PEFT's own mixed batches (``adapter_names``) register a hook in every LoRA layer at
    every call and, in each layer, gather and scatter each adapter's rows: a visible share of
    an eval step for matmuls of rank 8 (benchmarks/eval_phases.py). Here each LoRA layer's scaling
    becomes a (B, 1, 1) tensor, the adapter's scale on its own rows and 0 on the others,
    and PEFT's ordinary forward adds ``lora_B(lora_A(x)) * scaling`` to every row: the
    adapter's term on its rows, exactly nothing on the others. The small matmuls run on
    every row, which costs less than the routing. Layers other than plain LoRA linears
    (embeddings, variants such as DoRA) keep PEFT's mixed batches.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    names = [a or "__base__" for a in adapters]
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    used = sorted(set(names) - {"__base__"})
    if any(type(layer) is not LoraLinear or set(used) & set(layer.lora_variant) for layer in layers):
        with model.base_model._enable_peft_forward_hooks(adapter_names=names):
            yield
        return
    device = next(model.parameters()).device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32
    rows = {a: torch.tensor([n == a for n in names], dtype=dtype, device=device).view(-1, 1, 1) for a in used}
    masks: dict[tuple[str, float], torch.Tensor] = {}  # (adapter, scale) -> (B, 1, 1)
    saved = [(layer, dict(layer.scaling), layer._active_adapter) for layer in layers]
    try:
        for layer in layers:
            mine = [a for a in used if a in layer.lora_A]
            for a in mine:
                key = (a, layer.scaling[a])
                if key not in masks:
                    masks[key] = rows[a] * key[1]
                layer.scaling[a] = masks[key]
            layer._active_adapter = mine
        yield
    finally:
        for layer, scaling, active in saved:
            layer.scaling.clear()
            layer.scaling.update(scaling)
            layer._active_adapter = active


def merge_peft(model):
    return model.merge_and_unload()


def cache_dora_norms(model) -> None:
    """DoRA re-computes ||W + BA|| for every layer at every forward (benchmarks/generation.py
    measures what that costs a decode step).
    PEFT can cache it in eval mode (``ENABLE_DORA_CACHING``); the cache is cleared by the
    next forward in train mode, so training never reads a stale norm."""
    from peft.tuners.lora import dora

    dora.ENABLE_DORA_CACHING = True


for _name, _cls, _apply, _merge, _packing, _desc in [
    ("lora", LoraSettings, apply_lora, merge_peft, True, "low-rank updates to attention weights (Hu et al. 2021)"),
    ("dora", LoraSettings, apply_dora, merge_peft, True, "LoRA with weight-decomposed magnitude (Liu et al. 2024)"),
    ("ia3", IA3Settings, apply_ia3, merge_peft, True, "learned rescaling of keys, values and FFN inputs (Liu et al. 2022)"),
    ("prompt", PromptSettings, apply_prompt, None, False, "trainable soft-prompt embeddings (Lester et al. 2021)"),
    ("prefix", PrefixSettings, apply_prefix, None, False, "trainable key/value prefixes in every layer (Li & Liang 2021)"),
]:
    register(Method(name=_name, config_cls=_cls, apply=_apply, save=save_peft, load=load_peft, disable=disable_peft,
                    merge=_merge, supports_packing=_packing, description=_desc,
                    inference=cache_dora_norms if _name == "dora" else None,
                    route=route_lora if _name == "lora" else None))
