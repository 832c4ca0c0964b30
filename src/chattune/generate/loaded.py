"""Loading a trained run and decoding with it: the bridge from a run directory to the engine.

Every answer chattune writes (eval, chat, demo, compare, serve) is decoded by
``chattune.engine.Engine``; this module only builds its variants from a run (the tuned
model, and the base with the method switched off) and renders conversations to prompts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from chattune.data import render_prompt_ids, stop_strings, turn_token_ids
from chattune.engine import DEFAULTS, Engine, Request, SamplingParams, Variant
from chattune.methods import get_method
from chattune.training.init_from import load_start_model
from chattune.training import rundir
from chattune.training.settings import RunConfig


@dataclass
class LoadedRun:
    cfg: RunConfig
    model: torch.nn.Module
    tokenizer: object
    method: object
    run_dir: Path

    def base(self):
        """Context manager yielding a model that behaves as the untouched base."""
        if self.method.disable is not None:
            return _yielding(self.model, self.method.disable(self.model))
        return contextlib.nullcontext(self._fresh_base())

    def _fresh_base(self):
        if getattr(self, "_base", None) is None:  # full fine-tuning: the base is a second model, loaded once
            self._base = load_start_model(self.cfg.model).eval()
        return self._base

    @property
    def virtual_tokens(self) -> int:
        """Cache positions prompt or prefix tuning put in front of every prompt."""
        return getattr(self.cfg.method.settings(), "num_virtual_tokens", 0)

    def variants(self, base: bool = True) -> dict[str, Variant]:
        """The engine's variants: ``tuned``, and ``base`` (the method switched off) if asked."""
        if base and self.method.disable is None:
            return {"tuned": Variant(self.model, virtual_tokens=self.virtual_tokens), "base": Variant(self._fresh_base())}
        return method_variants(self.method, self.model, self.virtual_tokens, base=base)

    def engine(self, *, base: bool = True, max_batch: int = 16, dtype: torch.dtype | None = None,
               weights: str = "float32") -> Engine:
        """An engine over this run's variants. It takes over the packed weight copies of
        the previous engine made here (a chat's earlier turn), not packing them again."""
        # a chat template's end-of-turn token (<|im_end|>) also ends an answer: Request.end_ids
        engine = Engine(self.variants(base), self.tokenizer, self.tokenizer.eos_token_id, max_batch=max_batch,
                        dtype=dtype, weights=weights, share=getattr(self, "_engine", None))
        self._engine = engine
        return engine

    def request(self, conversation: list[dict], *, max_new_tokens: int, sampling: SamplingParams = DEFAULTS,
                variant: str = "tuned", on_text=None, tag=None, stop: list[str] | None = None) -> Request:
        """A request for the answer to ``conversation`` (ending with a user turn), in this run's template."""
        template = self.cfg.data.template
        if getattr(self, "_turn_ids", None) is None:
            self._turn_ids = turn_token_ids(self.tokenizer, template)
        end_ids, stop_ids = self._turn_ids
        return Request(render_prompt_ids(conversation, self.tokenizer, template), max_new_tokens, sampling, variant,
                       stop_strings(template, self.tokenizer) + list(stop or []), on_text, tag, end_ids, stop_ids)


def method_variants(method, model, virtual_tokens: int = 0, *, base: bool = True) -> dict[str, Variant]:
    """``tuned`` (the method on) and, if asked, ``base`` (the method switched off) on one
    model; where the method routes rows (LoRA), both share a lane: one forward per step."""
    lane = route = None
    if base and method.route is not None:
        adapter = model.active_adapter
        lane = "run"
        route = lambda names: method.route(model, [adapter if n == "tuned" else None for n in names])  # noqa: E731
    out = {"tuned": Variant(model, virtual_tokens=virtual_tokens, lane=lane, route=route)}
    if base:
        out["base"] = Variant(model, lambda: method.disable(model), lane=lane, route=route)
    return out


@contextlib.contextmanager
def _yielding(model, ctx):
    with ctx:
        yield model


def load_run(run_dir: str | Path) -> LoadedRun:
    run_dir = Path(run_dir)
    cfg = rundir.read_config(run_dir, finished=True)
    method = get_method(cfg.method.name)
    tokenizer = AutoTokenizer.from_pretrained(rundir.tokenizer_dir(run_dir))
    base = load_start_model(cfg.model)  # the base model, or the --init-from run it started from
    model = method.load(base, rundir.adapter_dir(run_dir))
    model.eval()
    if method.inference is not None:
        method.inference(model)
    return LoadedRun(cfg, model, tokenizer, method, run_dir)
