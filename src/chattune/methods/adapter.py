"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), written by hand.

Written here rather than imported: PEFT has no bottleneck adapters, and the ``adapters``
library pins an old transformers (and has no prompt tuning for GPT-2), so it cannot sit
beside the other methods in one environment.

An adapter is a small position-wise MLP added residually to a sublayer's output::

    out = h + up(act(down(h)))        h: (B, T, C), down: C -> b, up: b -> C

The up-projection starts at zero, so the adapted model equals the base model at step 0.
Each adapted sublayer is wrapped PEFT-style in an ``AdapterWrapper`` that keeps the
original module as ``base_layer``: base keys in the state dict only gain a
``.base_layer`` segment and stay recognisable.

Because the adapter sits between the sublayer and the residual add, it cannot be folded
into the surrounding weights (the activation is in the way): ``merge`` is None.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from chattune.config import field, from_dict
from chattune.errors import UserError
from chattune.methods.method import Method, register

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"

# model_type -> (path to the decoder layers, attention attribute, MLP attribute). Every
# attention module listed returns a tuple (attn_output, attn_weights).
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "gpt2": ("transformer.h", "attn", "mlp"),
    "llama": ("model.layers", "self_attn", "mlp"),
    "mistral": ("model.layers", "self_attn", "mlp"),
    "qwen2": ("model.layers", "self_attn", "mlp"),
    "qwen3": ("model.layers", "self_attn", "mlp"),
    "gemma": ("model.layers", "self_attn", "mlp"),
    "phi3": ("model.layers", "self_attn", "mlp"),
}

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass
class AdapterConfig:
    placement: Literal["houlsby", "pfeiffer"] = field(
        "pfeiffer",
        help="where adapters go in each decoder layer: 'houlsby' = after the attention output "
        "and after the MLP (Houlsby et al. 2019); 'pfeiffer' = after the MLP only (Pfeiffer et "
        "al. 2020), which they report on par with Houlsby at half the parameters, hence the default",
    )
    bottleneck_size: int | None = field(
        None, help="width of the bottleneck; when None it is hidden_size // reduction_factor"
    )
    reduction_factor: int = field(16, help="bottleneck = hidden_size // reduction_factor (if bottleneck_size is None)")
    activation: Literal["relu", "gelu", "silu"] = field("relu", help="non-linearity inside the bottleneck")
    residual_layer_norm: bool = field(
        False, help="apply a trainable LayerNorm to the adapter's input (the residual path stays un-normalised)"
    )
    dropout: float = field(0.0, help="dropout on the bottleneck activations during training")

    def __post_init__(self) -> None:
        if self.placement not in ("houlsby", "pfeiffer"):
            raise UserError(f"adapter.placement must be 'houlsby' or 'pfeiffer', got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"adapter.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.bottleneck_size is not None and (not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1):
            raise UserError(f"adapter.bottleneck_size must be a positive integer or None, got {self.bottleneck_size!r}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise UserError(f"adapter.reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"adapter.dropout must be in [0, 1), got {self.dropout!r}")

    def bottleneck(self, hidden_size: int) -> int:
        """The bottleneck width for a model of this hidden size."""
        size = self.bottleneck_size or hidden_size // self.reduction_factor
        if size < 1:
            raise UserError(
                f"adapter.reduction_factor={self.reduction_factor} leaves no bottleneck for hidden size "
                f"{hidden_size}; lower it or set adapter.bottleneck_size"
            )
        return size


class Adapter(nn.Module):
    """down -> act -> dropout -> up, returning only the delta (the caller adds h)."""

    def __init__(self, hidden: int, bottleneck: int, cfg: AdapterConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.norm = nn.LayerNorm(hidden, **kw) if cfg.residual_layer_norm else None
        self.down = nn.Linear(hidden, bottleneck, **kw)
        self.act = ACTIVATIONS[cfg.activation]()
        self.dropout = nn.Dropout(cfg.dropout)
        self.up = nn.Linear(bottleneck, hidden, **kw)
        # Zero up-projection: the delta is exactly 0 at step 0, so h + 0 == h bit for bit.
        # down keeps nn.Linear's default init; were it zero too, no gradient would flow.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h) if self.norm is not None else h  # (B, T, C)
        return self.up(self.dropout(self.act(self.down(x))))  # (B, T, b) -> (B, T, C)


class AdapterWrapper(nn.Module):
    """A sublayer whose output passes through an adapter: ``h + adapter(h)``.

    Attention modules return ``(attn_output, attn_weights)``; only element 0 is adapted,
    and the rest (weights, anything a model adds) passes through untouched. The adapter is
    position-wise (each token's delta depends only on its own h), so the keys and values
    cached for earlier tokens are the ones an uncached pass recomputes, and cached and
    uncached generation agree.
    """

    def __init__(self, base_layer: nn.Module, adapter: Adapter, cfg: AdapterConfig):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.cfg = cfg  # what save() writes to adapter_config.json
        self.disabled = False

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if self.disabled:
            return out
        if isinstance(out, tuple):
            return (out[0] + self.adapter(out[0]), *out[1:])
        return out + self.adapter(out)

    def __getattr__(self, name: str):
        # Callers that read attributes of the wrapped module (layer_idx, config, ...) still work.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


def _architecture(model: nn.Module) -> tuple[str, str, str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"bottleneck adapters do not support model type {model_type!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def _wrappers(model: nn.Module) -> Iterator[tuple[str, AdapterWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterWrapper):
            yield name, module


def apply(model: nn.Module, cfg: AdapterConfig, tokenizer=None) -> nn.Module:
    """Freeze the model and add bottleneck adapters to every decoder layer, in place.

    Args:
        model: a causal LM of a type in ``ARCHITECTURES`` (GPT-2, Llama-style).
        cfg: placement, bottleneck size, activation, layer norm and dropout.

    Returns:
        The same model object, with only the adapter parameters trainable.

    Raises:
        UserError: for an unsupported architecture or a model that already has adapters.
    """
    layers_path, attn_attr, mlp_attr = _architecture(model)
    if next(_wrappers(model), None) is not None:
        raise UserError("this model already has bottleneck adapters; apply them to a fresh base model")
    hidden = model.config.hidden_size
    bottleneck = cfg.bottleneck(hidden)
    ref = next(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [attn_attr, mlp_attr] if cfg.placement == "houlsby" else [mlp_attr]
    for layer in model.get_submodule(layers_path):
        for attr in targets:
            adapter = Adapter(hidden, bottleneck, cfg, dtype=ref.dtype, device=ref.device)
            setattr(layer, attr, AdapterWrapper(getattr(layer, attr), adapter, cfg))
    return model


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters of ``model`` by state-dict name (torchtune's ``get_adapter_params``)."""
    return {
        f"{name}.adapter.{pname}": p
        for name, wrapper in _wrappers(model)
        for pname, p in wrapper.adapter.named_parameters()
    }


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[None]:
    """Within this block every adapter is skipped and the model is exactly the base model."""
    wrappers = [w for _, w in _wrappers(model)]
    previous = [w.disabled for w in wrappers]
    for w in wrappers:
        w.disabled = True
    try:
        yield
    finally:
        for w, was in zip(wrappers, previous):
            w.disabled = was


def _config_of(model: nn.Module) -> AdapterConfig:
    first = next(_wrappers(model), None)
    if first is None:
        raise UserError("this model has no bottleneck adapters to save")
    return first[1].cfg


def save(model: nn.Module, directory: str | Path, state_dict: dict | None = None) -> None:
    """Write ``adapter_model.safetensors`` (adapter weights only) and ``adapter_config.json``;
    the weights from ``state_dict`` when given (a sharded model's gathered state)."""
    cfg = _config_of(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (p if state_dict is None else state_dict[k]).detach().contiguous()
               for k, p in adapter_params(model).items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt", "method": "adapter"})
    (out / CONFIG_NAME).write_text(json.dumps({"method": "adapter", **dataclasses.asdict(cfg)}, indent=2) + "\n")


def load(base_model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild a saved adapter model on a fresh base model (bit-exact weights).

    Args:
        base_model: the same base model the adapters were trained on, without adapters.
        directory: a folder written by ``save``.

    Returns:
        ``base_model`` with adapters applied and their trained weights loaded.

    Raises:
        UserError: when files are missing, the folder holds another method, or the
            weights do not fit this base model.
    """
    src = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (src / name).is_file():
            raise UserError(f"{src}: no {name}; is this a bottleneck-adapter run?")
    data = json.loads((src / CONFIG_NAME).read_text())
    method = data.pop("method", None)
    if method != "adapter":
        raise UserError(f"{src / CONFIG_NAME}: method is {method!r}, not 'adapter'")
    model = apply(base_model, from_dict(AdapterConfig, data, where="adapter"))
    _copy_weights(model, load_file(str(src / WEIGHTS_NAME)), src)
    return model


def _copy_weights(model: nn.Module, tensors: dict[str, torch.Tensor], src: Path) -> None:
    params = adapter_params(model)
    missing, unexpected = params.keys() - tensors.keys(), tensors.keys() - params.keys()
    if missing or unexpected:
        raise UserError(
            f"{src / WEIGHTS_NAME} does not fit this base model "
            f"({len(missing)} adapter tensors missing, {len(unexpected)} unexpected)"
        )
    with torch.no_grad():
        for name, p in params.items():
            got = tuple(tensors[name].shape)
            if got != tuple(p.shape):
                raise UserError(f"{src / WEIGHTS_NAME}: {name} has shape {got}, expected {tuple(p.shape)}")
            p.copy_(tensors[name])


def trainable_param_formula(config, cfg: AdapterConfig) -> int:
    """Expected number of trainable parameters for a transformers model config.

    Per adapter: down (C*b + b) + up (b*C + C), plus 2*C for the LayerNorm when enabled;
    times adapters per layer (2 for Houlsby, 1 for Pfeiffer) times the number of layers.
    """
    hidden, b = config.hidden_size, cfg.bottleneck(config.hidden_size)
    per_adapter = 2 * hidden * b + b + hidden + (2 * hidden if cfg.residual_layer_norm else 0)
    per_layer = 2 if cfg.placement == "houlsby" else 1
    return per_adapter * per_layer * config.num_hidden_layers


register(
    Method(
        name="adapter",
        config_cls=AdapterConfig,
        apply=apply,
        save=save,
        load=load,
        disable=disable,
        merge=None,  # the non-linearity between down and up cannot fold into plain weights
        supports_packing=True,  # position-wise: each token's output depends only on its own h
        description="bottleneck adapters after the MLP (Pfeiffer) or attention and MLP (Houlsby); not mergeable",
    )
)
