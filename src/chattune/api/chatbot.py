"""``chattune.load``: a run (or a plain model) on the one decoding engine, as a ``Chatbot``.

``.chat`` and ``.stream`` answer one conversation as ``chattune chat`` does (an engine of
one slot); ``.generate`` answers many at once with continuous batching, like vLLM's
offline ``LLM.generate``. Under greedy decoding a batch gives the answers one at a time
would (tests/test_api.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chattune.engine.sampling import DEFAULTS, SamplingParams
from chattune.errors import UserError

if TYPE_CHECKING:
    from chattune.generate.loaded import LoadedRun

Conversation = str | list[dict]
SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@dataclass
class Answer:
    """One decoded answer.

    Attributes:
        text: the answer, without the stop marker or end-of-turn token.
        tokens: how many tokens were generated (EOS excluded).
        finish_reason: ``eos`` (the model ended it), ``stop`` (a stop string or the next
            turn's marker), ``length`` (cut at ``max_new_tokens``).
        prompt_tokens: the prompt's length in tokens.
        token_ids: the generated token ids.
    """

    text: str
    tokens: int
    finish_reason: str
    prompt_tokens: int
    token_ids: list[int] = dataclasses.field(repr=False)


def _pieces(engine, pieces: list[str]) -> Iterator[str]:
    while engine.has_work():
        engine.step()
        yield from pieces
        pieces.clear()


def _conversation(item: Conversation) -> list[dict]:
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    if isinstance(item, list) and item and all(isinstance(m, dict) for m in item):
        return item
    raise UserError("a prompt is a string or a list of {'role': ..., 'content': ...} messages ending with the user's")


class Chatbot:
    """A loaded run on the decoding engine (``chattune.load`` builds it).

    Args:
        run: the loaded run (``chattune.generate.loaded.load_run``).
        base: answer with the method switched off (the base model).
        max_new_tokens: the default budget per answer.
    """

    def __init__(self, run: LoadedRun, *, base: bool = False, max_new_tokens: int = 256,
                 decode_weights: str = "float32"):
        self.run, self.base, self.max_new_tokens = run, base, max_new_tokens
        self.decode_weights = decode_weights

    def __repr__(self) -> str:
        who = "base" if self.base else self.run.cfg.method.name
        return f"Chatbot({self.run.run_dir or self.run.cfg.model.name}, {who})"

    @property
    def model(self):
        """The loaded torch model (the method applied)."""
        return self.run.model

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def run_dir(self) -> Path | None:
        """The run directory; None for a plain model."""
        return self.run.run_dir

    def _sampling(self, sampling: SamplingParams | None, changes: dict) -> SamplingParams:
        unknown = [k for k in changes if k not in SAMPLING_KEYS]
        if unknown:
            raise UserError(f"unknown sampling setting '{unknown[0]}'; choose from {', '.join(SAMPLING_KEYS)}")
        return (sampling or DEFAULTS).with_(**changes)

    def _request(self, conversation: list[dict], max_new_tokens: int | None, sampling: SamplingParams, **kw):
        return self.run.request(conversation, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                sampling=sampling, variant="base" if self.base else "tuned", **kw)

    def stream(self, messages: Conversation, *, max_new_tokens: int | None = None,
               sampling: SamplingParams | None = None, **changes: Any) -> Iterator[str]:
        """Answer one conversation, yielding the text as it is decoded.

        Args:
            messages: a question, or a conversation ending with the user's turn.
            max_new_tokens: the budget (default: the Chatbot's, 256).
            sampling: the engine's ``SamplingParams`` (default ``chattune.DEFAULTS``, the
                shipped decoding; ``chattune.GREEDY`` for argmax).
            **changes: sampling settings to change: temperature, top_p, top_k,
                repetition_penalty, seed.

        Yields:
            Pieces of text; joined, they are the answer (stop markers never appear).
        """
        pieces: list[str] = []  # a mistake is raised here, not at the first piece
        request = self._request(_conversation(messages), max_new_tokens, self._sampling(sampling, changes),
                                on_text=pieces.append)
        engine = self.run.engine(base=self.base, max_batch=1, weights=self.decode_weights)
        engine.add(request)
        return _pieces(engine, pieces)

    def chat(self, messages: Conversation, *, max_new_tokens: int | None = None,
             sampling: SamplingParams | None = None, **changes: Any) -> str:
        """Answer one conversation; the arguments are ``stream``'s. Returns the answer's text."""
        return "".join(self.stream(messages, max_new_tokens=max_new_tokens, sampling=sampling, **changes))

    def generate(self, prompts: Sequence[Conversation], sampling: SamplingParams | None = None, *,
                 max_new_tokens: int | None = None, max_batch: int = 32) -> list[Answer]:
        """Answer many prompts at once (continuous batching); answers in the prompts' order.

        Args:
            prompts: questions, or conversations ending with the user's turn.
            sampling: one ``SamplingParams`` for all (default ``chattune.DEFAULTS``); a
                seeded sampling gives every prompt the same seed.
            max_new_tokens: the budget per answer (default: the Chatbot's, 256).
            max_batch: answers decoded at once.
        """
        if isinstance(prompts, str):
            raise UserError("generate takes a list of prompts; use chat for one")
        params = self._sampling(sampling, {})
        requests = [self._request(_conversation(p), max_new_tokens, params) for p in prompts]
        answers = self.run.engine(base=self.base, max_batch=max_batch, weights=self.decode_weights).run(requests)
        return [Answer(a.text, len(a.token_ids), a.finish_reason, a.prompt_tokens, a.token_ids) for a in answers]


def load(run_or_model: str | os.PathLike, base: bool = False, decode_weights: str = "float32") -> Chatbot:
    """Load a trained run, or a plain model, onto the decoding engine.

    Args:
        run_or_model: a run directory (or ``Run``); or a model as ``--model`` takes it (hub
            id, local HF directory, .gguf file, ``smollm2-135m``), answered as it is.
        base: answer with the run's method switched off: its base model.
        decode_weights: the decode step's weight precision on a CPU: ``float32`` (the
            default), ``float16`` or ``bfloat16`` (faster at one answer; answers may
            differ: docs/chat-and-export.md).

    Returns:
        A ``Chatbot`` with ``.chat``, ``.stream`` and ``.generate``.

    Raises:
        UserError: not a finished run, or a model that does not load.
    """
    from chattune.generate.loaded import load_run

    path = Path(run_or_model)
    if _is_model(path):
        return Chatbot(_plain_model(str(run_or_model)), decode_weights=decode_weights)
    return Chatbot(load_run(path), base=base, decode_weights=decode_weights)


def _is_model(path: Path) -> bool:
    """A model name or model directory rather than a run (a run has config.yaml; a
    directory that has neither is reported as 'not a finished run')."""
    if path.is_dir():
        return not (path / "config.yaml").exists() and (path / "config.json").is_file()
    return path.suffix == ".gguf" or not path.exists()


def _plain_model(name: str) -> LoadedRun:
    """A model with no method on it: a run of ``full`` that never trained."""
    from chattune.config import from_dict
    from chattune.generate.loaded import LoadedRun
    from chattune.methods import get_method
    from chattune.models.loading import load_tokenizer
    from chattune.training.init_from import load_start_model
    from chattune.training.settings import RunConfig

    cfg = from_dict(RunConfig, {"model": {"name": name}, "method": {"name": "full"}}, "config")
    tokenizer = load_tokenizer(name, cfg.model.trust_remote_code)
    return LoadedRun(cfg, load_start_model(cfg.model).eval(), tokenizer, get_method("full"), None)
