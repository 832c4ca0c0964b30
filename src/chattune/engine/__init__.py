"""The one decoding engine (batched, KV-cached, continuous batching) and its sampling settings."""

from chattune.engine.core import Answer, Engine, PromptTooLong, Request, Variant
from chattune.engine.sampling import DEFAULTS, GREEDY, SamplingParams

__all__ = ["Answer", "Engine", "PromptTooLong", "Request", "Variant", "DEFAULTS", "GREEDY", "SamplingParams"]
