"""What the chat routes (app.py) and the arena routes (arena_routes.py) share: OpenAI's
error and chat-completion shapes, and turning a conversation into an engine request."""

from __future__ import annotations

import json
import time
import uuid

from fastapi.responses import JSONResponse

from chattune.engine import Answer, SamplingParams
from chattune.errors import UserError
from chattune.serve.models import Served

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def error_body(status: int, message: str) -> dict:
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}


def engine_request(served: Served, model: str, conversation: list[dict], *, max_new_tokens: int,
                   sampling: SamplingParams, stop: list[str]):
    """The engine request of ``conversation`` (user/assistant turns) for served ``model``."""
    if model not in served.variants:
        raise ApiError(404, f"model '{model}' is not served here; models: {', '.join(served.names)}",
                       param="model", code="model_not_found")
    # base is prompted in the first run's template, as `chattune chat RUN --base` does
    run = served.runs.get(model) or next(iter(served.runs.values()))
    try:
        return run.request(conversation, max_new_tokens=max_new_tokens, sampling=sampling, variant=model, stop=stop)
    except UserError as e:  # e.g. a chat template that refuses this conversation
        raise ApiError(400, str(e), param="messages") from None


class Reply:
    """The OpenAI response and chunk objects of one request (a battle's two answers are
    the choices 0 and 1 of one reply, as OpenAI streams ``n=2``)."""

    def __init__(self, model: str, prefix: str = "chatcmpl"):
        self.id, self.model, self.created = f"{prefix}-{uuid.uuid4().hex}", model, int(time.time())

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(*answers: Answer) -> dict:
        prompt = sum(a.prompt_tokens for a in answers)
        done = sum(len(a.token_ids) for a in answers)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def whole(self, *answers: Answer) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": a.text},
                    "finish_reason": FINISH[a.finish_reason]} for i, a in enumerate(answers)]
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage(*answers)}

    def chunk(self, delta: dict, finish: str | None = None, index: int = 0) -> str:
        data = {**self._head("chat.completion.chunk"),
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(data)}\n\n"

    def usage_chunk(self, *answers: Answer) -> str:
        data = {**self._head("chat.completion.chunk"), "choices": [], "usage": self.usage(*answers)}
        return f"data: {json.dumps(data)}\n\n"
