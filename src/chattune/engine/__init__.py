"""The one decoding engine (batched, KV-cached, continuous batching) and its sampling settings."""

from chattune.engine.core import Engine, Variant
from chattune.engine.requests import Answer, PromptTooLong, Request
from chattune.engine.sampling import DEFAULTS, GREEDY, SamplingParams

__all__ = ["Answer", "Engine", "PromptTooLong", "Request", "Variant", "DEFAULTS", "GREEDY", "SamplingParams"]
