"""What callers give the engine and get back: a ``Request`` (a prompt, its budget, sampling
settings, stop rules and variant) and its ``Answer``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from chattune.engine.sampling import DEFAULTS, SamplingParams
from chattune.errors import UserError


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 512
    sampling: SamplingParams = DEFAULTS
    variant: str = "tuned"
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] | None = None  # streamed text deltas (stop strings held back)
    tag: object = None  # the caller's own id, returned with the answer
    # Token ids beyond EOS: ``end_ids`` close the answer as EOS does (a chat template's
    # end-of-turn token when it is not the tokenizer's EOS); ``stop_ids`` end it as a stop
    # string does (a template's turn-opening special token, invisible in the decoded text).
    end_ids: tuple[int, ...] = ()
    stop_ids: tuple[int, ...] = ()


@dataclass
class Answer:
    tag: object
    text: str
    token_ids: list[int]  # generated tokens, EOS excluded
    finish_reason: str  # "eos" | "stop" (a stop string or stop id) | "length" | "cancelled"
    prompt_tokens: int
    seconds: float = 0.0
    request: Request | None = field(default=None, repr=False, compare=False)

    @property
    def stopped(self) -> bool:
        """Ended by the model itself with EOS."""
        return self.finish_reason == "eos"


class PromptTooLong(UserError):
    pass
