"""Several trained runs on one base model, as the engine's variants.

The base is loaded once and every run's method is attached to that one module tree:
- LoRA and DoRA runs are named adapters of one ``PeftModel`` (PEFT keeps one set of
  A/B matrices per adapter name in every targeted layer);
- IA3 runs are named adapters of a second ``PeftModel`` whose layers wrap the same
  modules (PEFT refuses to mix adapter types inside one ``PeftModel``);
- prompt and prefix tuning runs are ``PeftModel`` wrappers that change only the input
  (virtual tokens, key/value prefixes), one per type, with a named adapter per run;
- a bottleneck-adapter run wraps the decoder sublayers (``chattune.methods.adapter``).
Which of these is on is set per engine lane by the variant's context: the run's own
adapter is switched on and every other one off; ``base`` switches all of them off.
LoRA runs (the methods with a ``route``) and ``base`` share one lane: a decode step runs
their rows in one forward, each row through its own adapter (PEFT's mixed adapter
batches), so clients of different LoRA runs do not split the batch.

PEFT's own ``disable_adapter()`` cannot be used for that: it enables or disables *every*
tuner layer under the model, including those of the other ``PeftModel`` on the same
modules, so each tuner layer is switched here through PEFT's layer API
(``BaseTunerLayer.enable_adapters`` / ``set_adapter``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoTokenizer

from chattune.engine import Variant
from chattune.errors import UserError
from chattune.generate.loaded import LoadedRun, load_run
from chattune.methods import adapter as bottleneck
from chattune.methods import get_method
from chattune.models.loading import load_model
from chattune.training import rundir
from chattune.training.settings import RunConfig

BASE = "base"
# Loading order matters: a PEFT tuner loads its weights by module path, and every later
# wrapper (IA3 around LoRA layers, bottleneck wrappers around sublayers) moves the paths
# of the layers below it. Prompt learning does not touch the modules at all.
_ORDER = {"lora": 0, "dora": 0, "ia3": 1, "prompt": 2, "prefix": 3, "adapter": 4}


@dataclass
class Served:
    """What ``chattune serve`` decodes with: one engine variant per run name, plus ``base``."""

    runs: dict[str, LoadedRun]  # name -> the run (its template renders that run's prompts)
    variants: dict[str, "Variant"]
    tokenizer: object
    base_model: str  # the shared config model.name

    @property
    def names(self) -> list[str]:
        return [*self.runs, BASE]


def parse_specs(specs: list[str]) -> dict[str, Path]:
    """``RUN`` or ``name=RUN`` -> {name: path}; the default name is the directory's name."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).resolve().name, spec
        if not name or not path:
            raise UserError(f"'{spec}': give a run as RUN_DIR or NAME=RUN_DIR")
        if name == BASE:
            raise UserError(f"'{BASE}' names the base model; give the run another name: NAME={path}")
        if name in out:
            raise UserError(f"two runs are named '{name}'; name them apart: NAME=RUN_DIR")
        out[name] = Path(path)
    return out


def load_served(specs: list[str]) -> Served:
    """Load every run in ``specs`` (``RUN`` or ``name=RUN``) on one shared base model."""
    paths = parse_specs(specs)
    cfgs = {name: rundir.read_config(path, finished=True) for name, path in paths.items()}
    bases = {cfg.model.name for cfg in cfgs.values()}
    if len(bases) > 1:
        which = ", ".join(f"{n}: {c.model.name}" for n, c in cfgs.items())
        raise UserError(f"all runs must share one base model, got {which}")
    if any(c.method.name == "full" for c in cfgs.values()):
        if len(cfgs) > 1:
            raise UserError("a full fine-tuning run has its own weights, not a method on the shared base: "
                            "serve it alone")
        return _served_full(paths)
    return _served_shared(paths, cfgs)


def _served_full(paths: dict[str, Path]) -> Served:
    (name, path), = paths.items()
    run = load_run(path)
    variants = run.variants(base=True)
    return Served({name: run}, {name: variants["tuned"], BASE: variants["base"]}, run.tokenizer, run.cfg.model.name)


def _served_shared(paths: dict[str, Path], cfgs: dict[str, RunConfig]) -> Served:
    first = next(iter(cfgs.values()))
    raw = load_model(first.model.name, trust_remote_code=first.model.trust_remote_code,
                     attn_implementation=first.model.attn_implementation).eval()
    tokenizers = {name: AutoTokenizer.from_pretrained(rundir.tokenizer_dir(path)) for name, path in paths.items()}
    if len({len(t) for t in tokenizers.values()}) > 1:
        raise UserError("the runs' tokenizers differ in size; they were not trained on the same base")
    switch = _Switch(raw)
    # PEFT's adapter names are module-dict keys: no dots, and a name like "lora" clashes with
    # the "lora_" parameter prefix; so adapters get plain ids, the public names stay ours
    ids = {name: f"run{i}" for i, name in enumerate(paths)}
    models: dict[str, torch.nn.Module] = {}
    wrappers: dict[str, PeftModel] = {}  # one PeftModel per PEFT type
    for name in sorted(cfgs, key=lambda n: _ORDER[cfgs[n].method.name]):
        method, adapter_dir = cfgs[name].method.name, rundir.adapter_dir(paths[name])
        if method == "adapter":
            models[name] = _attach_bottleneck(raw, adapter_dir, switch, ids[name], name)
            continue
        kind = json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"]
        if kind not in wrappers:
            wrappers[kind] = PeftModel.from_pretrained(raw, adapter_dir, adapter_name=ids[name],
                                                         is_trainable=False)
        else:
            wrappers[kind].load_adapter(adapter_dir, adapter_name=ids[name], is_trainable=False)
        models[name] = wrappers[kind]
        if get_method(method).inference is not None:
            get_method(method).inference(models[name])
    switch.collect()
    routes = {name: get_method(cfgs[name].method.name).route for name in cfgs}
    routed = {name for name, r in routes.items() if r is not None}
    lane = route = None
    if routed:  # the LoRA runs and base: one forward per step
        lora, method_route = wrappers["LORA"], routes[next(iter(routed))]
        lane = "lora"
        route = lambda names: switch.mixed(lora, [ids.get(n) for n in names], method_route)  # noqa: E731  (base: None)
    runs, variants = {}, {}
    for name, path in paths.items():  # command-line order
        cfg = cfgs[name]
        model = models[name].eval()
        runs[name] = LoadedRun(cfg, model, tokenizers[name], get_method(cfg.method.name), path)
        peft_model = model if isinstance(model, PeftModel) else None
        shared = name in routed
        variants[name] = Variant(model, lambda n=ids[name], m=peft_model: switch.only(n, m),
                                 runs[name].virtual_tokens, lane if shared else None, route if shared else None)
    variants[BASE] = Variant(raw, lambda: switch.only(None, None), lane=lane, route=route)
    return Served(runs, variants, next(iter(tokenizers.values())), first.model.name)


def _attach_bottleneck(raw: torch.nn.Module, adapter_dir: Path, switch: "_Switch", adapter_id: str,
                       name: str) -> torch.nn.Module:
    if switch.bottleneck is not None:
        # chattune's bottleneck adapters wrap each sublayer once; a second set would wrap the first
        raise UserError(f"'{name}' is a second bottleneck-adapter run; serve one of them per server")
    bottleneck.load(raw, adapter_dir)
    switch.bottleneck = adapter_id
    return raw


class _Switch:
    """Turns every method attached to the shared base on or off, one run at a time."""

    def __init__(self, raw: torch.nn.Module):
        self.raw = raw
        self.bottleneck: str | None = None
        self.tuner_layers: list[BaseTunerLayer] = []
        self.current: tuple | None = None  # (name,) of the run switched on last

    def collect(self) -> None:
        self.tuner_layers = [m for m in self.raw.modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def only(self, name: str | None, peft_model: PeftModel | None):
        """Within this block only run ``name``'s method is on (None: none, the base model)."""
        if self.current != (name,):  # the engine enters a lane's context every step: switch on change only
            for layer in self.tuner_layers:
                mine = name is not None and name in _adapter_names(layer)
                layer.enable_adapters(mine)
                if mine:
                    layer.set_adapter(name, inference_mode=True)
            for _, wrapper in bottleneck._wrappers(self.raw):
                wrapper.disabled = name != self.bottleneck
            if peft_model is not None and peft_model.peft_config[name].is_prompt_learning:
                peft_model.set_adapter(name)  # which prompt encoder the PeftModel's forward uses
            self.current = (name,)
        yield

    @contextlib.contextmanager
    def mixed(self, lora: PeftModel, adapters: list[str | None], route):
        """Only the LoRA layers on, row i through adapter ``adapters[i]`` (None: the base),
        under the method's ``route``."""
        if self.current != ("mixed",):
            for layer in self.tuner_layers:
                on = isinstance(layer, LoraLayer)
                layer.enable_adapters(on)
                if on:
                    layer.set_adapter(layer.active_adapters, inference_mode=True)
            for _, wrapper in bottleneck._wrappers(self.raw):
                wrapper.disabled = True
            self.current = ("mixed",)
        with route(lora, adapters):
            yield


def _adapter_names(layer: BaseTunerLayer) -> set[str]:
    names: set[str] = set()
    for attr in layer.adapter_layer_names:
        names.update(getattr(layer, attr).keys())
    return names
