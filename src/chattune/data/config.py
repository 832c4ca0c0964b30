"""The ``data:`` section of a run: where conversations come from, which are kept, how they render.

Validated in ``__post_init__`` so a bad value fails at start-up with one line, whether it
came from YAML, a ``--set`` override or ``chattune data`` flags.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from chattune.config import closest, field
from chattune.errors import UserError

FORMATS = ["auto", "arena", "messages", "sharegpt", "alpaca", "prompt-answers", "pairs", "unpaired"]
SIDES = ["winner", "a", "b", "both"]
TURNS = ["all", "first"]
TEMPLATES = ["seed", "chat", "auto"]
PRESETS = ["seed"]

# What the seed notebook did (../shared/seed/NOTEBOOK.md): conversation_a only, its first
# pair, 10 < len < 1000 for the prompt and 10 < len < 1500 for the answer (our bounds are
# inclusive), every row whatever its flags, no de-duplication, no loop filter, and its
# '### Human:' template.
SEED_PRESET = {
    "side": "a", "turns": "first", "keep_flagged": True, "dedup": False, "max_answer_repetition": 0.0,
    "template": "seed",
    "min_prompt_chars": 11, "max_prompt_chars": 999, "min_response_chars": 11, "max_response_chars": 1499,
}


@dataclass
class DataConfig:
    dataset: str = field("sample", help="'sample' (built in), a hub dataset id such as "
                         "lmsys/chatbot_arena_conversations, or a local .jsonl/.json/.parquet file")
    format: str = field("auto", help="row format: auto|arena|messages|sharegpt|alpaca|prompt-answers|pairs "
                        "({prompt, chosen, rejected})|unpaired ({prompt, completion, label}: kto)")
    answer_model: str | None = field(None, help="prompt-answers rows: whose answer to train on")
    chosen_model: str | None = field(None, help="prompt-answers rows as preference pairs: the preferred model")
    rejected_model: str | None = field(None, help="prompt-answers rows as preference pairs: the other model")
    preset: str | None = field(None, help="'seed' reproduces the seed notebook's selection: side a, first pair, "
                               "10 < prompt < 1000 and 10 < response < 1500 chars, no flag filter, no dedup, no loop "
                               "filter, the seed template")
    side: str = field("winner", help="arena rows: winner (the human vote; a tie gives both, 'tie (bothbad)' "
                      "is dropped) | a | b | both")
    turns: str | None = field(None, help="all turns, or only the first user->assistant pair (default: all for "
                              "SFT; first for preference pairs)")
    keep_flagged: bool = field(False, help="keep rows flagged by OpenAI moderation or toxic-chat tags")
    language: str | None = field(None, help="keep only this language (e.g. English)")
    min_prompt_chars: int | None = field(None, help="drop a conversation with a user turn shorter than this")
    max_prompt_chars: int | None = field(None, help="drop a conversation with a user turn longer than this")
    min_response_chars: int | None = field(None, help="drop a conversation with an answer shorter than this")
    max_response_chars: int | None = field(None, help="drop a conversation with an answer longer than this")
    dedup: bool = field(True, help="drop exact duplicate conversations")
    max_answer_repetition: float = field(
        0.3, help="drop a conversation with an answer whose share of words inside a span repeated back to back "
                  "(3+ times; lists, tables and code with changing values are not repeats) is above this "
                  "(reason looping_answer); 0 or 1 switches the filter off")
    template: str = field("auto", help="auto (the tokenizer's chat template when it has one, else seed), chat "
                          "(the tokenizer's own chat template) or seed ('### Human:' / '### Assistant:' + EOS)")
    train_on_prompt: bool = field(False, help="loss on every token, prompts included (the seed's loss)")
    max_length: int = field(1024, help="tokens per sample; later turns are dropped to fit")
    val_ratio: float = field(0.1, help="share of prompts in the validation split")
    test_ratio: float = field(0.1, help="share of prompts in the test split")
    max_rows: int | None = field(None, help="read at most this many rows (quick runs)")
    strict: bool = field(False, help="stop at the first bad row, naming file and line, instead of counting it")

    def __post_init__(self) -> None:
        for name, valid in (("format", FORMATS), ("side", SIDES), ("turns", TURNS), ("template", TEMPLATES)):
            value = getattr(self, name)
            if value not in valid and not (name == "turns" and value is None):
                raise UserError(f"data.{name}: '{value}' is not one of {', '.join(valid)}{closest(str(value), valid)}")
        if self.preset is not None:
            self._apply_preset()
        self._check_numbers()

    def _apply_preset(self) -> None:
        if self.preset not in PRESETS:
            raise UserError(f"data.preset: unknown preset '{self.preset}'; known: {', '.join(PRESETS)}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in SEED_PRESET.items():
            current = getattr(self, name)
            # An explicit conflicting choice is an error, not silently overridden.
            if current != defaults[name] and current != value:
                raise UserError(f"data.preset seed sets {name}={value}; it cannot be combined with {name}={current}")
            setattr(self, name, value)

    def _check_numbers(self) -> None:
        if self.max_length < 2:
            raise UserError(f"data.max_length must be at least 2, got {self.max_length}")
        if self.max_rows is not None and self.max_rows < 1:
            raise UserError(f"data.max_rows must be positive, got {self.max_rows}")
        for kind in ("prompt", "response"):
            low, high = getattr(self, f"min_{kind}_chars"), getattr(self, f"max_{kind}_chars")
            if any(v is not None and v < 0 for v in (low, high)):
                raise UserError(f"data: {kind} character bounds must not be negative")
            if low is not None and high is not None and low > high:
                raise UserError(f"data: min_{kind}_chars ({low}) is above max_{kind}_chars ({high})")
        if not 0 <= self.max_answer_repetition <= 1:
            raise UserError(f"data.max_answer_repetition must be between 0 and 1 (0 or 1: off), "
                            f"got {self.max_answer_repetition}")
        if not (0 <= self.val_ratio < 1 and 0 <= self.test_ratio < 1 and self.val_ratio + self.test_ratio < 1):
            raise UserError(f"data: val_ratio ({self.val_ratio}) and test_ratio ({self.test_ratio}) must be "
                            "non-negative and leave a training share")
