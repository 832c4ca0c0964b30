"""Loading a trained run, batched greedy generation for eval, and streaming chat."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoTokenizer, LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TextStreamer, TopKLogitsWarper, TopPLogitsWarper)

from chattune.config import from_dict, load_yaml
from chattune.data import render_prompt_ids, stop_strings
from chattune.errors import UserError
from chattune.methods import get_method
from chattune.init_from import load_start_model
from chattune.settings import RunConfig


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
        return contextlib.nullcontext(load_start_model(self.cfg.model))


@contextlib.contextmanager
def _yielding(model, ctx):
    with ctx:
        yield model


def load_run(run_dir: str | Path) -> LoadedRun:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise UserError(f"{run_dir} is not a finished chattune run (needs config.yaml and adapter/)")
    cfg = from_dict(RunConfig, load_yaml(run_dir / "config.yaml"), "config")
    method = get_method(cfg.method.name)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    base = load_start_model(cfg.model)  # the base model, or the --init-from run it started from
    model = method.load(base, run_dir / "adapter")
    model.eval()
    return LoadedRun(cfg, model, tokenizer, method, run_dir)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def sampling_processors(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                        repetition_penalty: float = 1.0) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if repetition_penalty and repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature > 0:
        procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], *, max_new_tokens: int, eos_id: int, device, dtype=None,
                 temperature: float = 0.0, processors: LogitsProcessorList | None = None,
                 stop=None, on_token=None) -> tuple[list[int], bool]:
    """Decode one answer with the KV cache; returns (new token ids without EOS, ended with EOS).

    Written here rather than calling ``model.generate``: with PEFT prompt and prefix tuning,
    transformers 5's ``generate`` numbers positions differently with and without the cache
    (the virtual tokens are not counted consistently), so greedy answers changed with
    ``use_cache``. This loop runs the first step through the method's own forward, exactly
    as in training, then feeds one token at a time to the underlying model with the cache;
    the model derives each position from the cache length, which counts the virtual tokens
    the same way training did. ``stop(ids)`` may end decoding early (stop strings);
    ``on_token(id)`` is called for streaming.
    """
    model.eval()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = torch.tensor([prompt_ids], device=device)  # (1, T)
    out_ids: list[int] = []
    past = None
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(max_new_tokens):
            if past is None:
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            else:
                out = inner(input_ids=ids[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()  # (1, V)
            if processors:
                logits = processors(ids, logits)
            if temperature > 0:
                token = int(torch.multinomial(torch.softmax(logits, -1), 1))
            else:
                token = int(logits.argmax(-1))
            if token == eos_id:
                return out_ids, True
            out_ids.append(token)
            if on_token is not None:
                on_token(token)
            if stop is not None and stop(out_ids):
                return out_ids, False
            ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return out_ids, False


def _stop_on(tokenizer, stops: list[str]):
    longest = max((len(s) for s in stops), default=0)

    def stop(ids: list[int]) -> bool:  # decode only a short tail: O(1) per token
        return bool(stops) and any(s in tokenizer.decode(ids[-(longest + 2):]) for s in stops)

    return stop


def generate_batch(model, tokenizer, conversations: list[list[dict]], template: str, *, max_new_tokens: int,
                   device, dtype=None) -> list[dict]:
    """Greedy answers to conversations ending in a user turn.

    Returns dicts with ``text``, ``ids`` (answer tokens without the EOS) and ``stopped``
    (True when the answer ended with EOS before ``max_new_tokens``).
    """
    stops = stop_strings(template)
    results = []
    for conv in conversations:
        ids, stopped = generate_ids(model, render_prompt_ids(conv, tokenizer, template), max_new_tokens=max_new_tokens,
                                    eos_id=tokenizer.eos_token_id, device=device, dtype=dtype,
                                    stop=_stop_on(tokenizer, stops))
        text, _ = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stops)
        results.append({"text": text.strip(), "ids": ids, "stopped": stopped})
    return results


class StopAwareStreamer(TextStreamer):
    """Prints tokens as they come, holding back any tail that may be the start of a stop
    string (e.g. ``### Human:``) so the marker itself is never shown."""

    def __init__(self, tokenizer, stops: list[str], out=None):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.stops, self.out, self.pending, self.done, self.text = stops, out or sys.stdout, "", False, ""

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.done:
            return
        self.pending += text
        visible, hit = cut_at_stop(self.pending, self.stops)
        if hit:
            self.done = True
            self._emit(visible)
            return
        hold = 0 if stream_end else max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        ready, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        self._emit(ready)

    def _emit(self, text: str):
        self.text += text
        self.out.write(text)
        self.out.flush()


def stream_answer(model, tokenizer, conversation: list[dict], template: str, *, device, dtype=None,
                  max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50,
                  repetition_penalty: float = 1.1, out=None) -> str:
    """Generate one answer, streaming it to ``out`` (default stdout); returns the answer text."""
    out = out or sys.stdout
    stops = stop_strings(template)
    streamer = StopAwareStreamer(tokenizer, stops, out)
    procs = sampling_processors(temperature, top_p, top_k, repetition_penalty)
    generate_ids(model, render_prompt_ids(conversation, tokenizer, template), max_new_tokens=max_new_tokens,
                 eos_id=tokenizer.eos_token_id, device=device, dtype=dtype, temperature=temperature,
                 processors=procs, stop=_stop_on(tokenizer, stops),
                 on_token=lambda t: streamer.put(torch.tensor([t])))
    streamer.end()
    out.write("\n")
    return streamer.text.strip()
