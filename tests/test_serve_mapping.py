"""The serve request mapping, in-process and without a model: OpenAI messages -> turns,
sampling fields -> SamplingParams, engine outcomes -> OpenAI bodies and status codes.

The run and the worker are stand-ins that record what the app hands them, so each field
of a request can be traced to the engine request it becomes (test_serve.py drives the
same app with real runs, end to end). Fast enough for ``make mutate``.
"""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'chattune[serve]'")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from chattune.engine import DEFAULTS, Answer, PromptTooLong, Request  # noqa: E402
from chattune.errors import UserError  # noqa: E402
from chattune.serve.app import MAX_BODY, Message, _conversation, _stream, _whole, build_app  # noqa: E402
from chattune.serve.protocol import ApiError, Reply  # noqa: E402
from chattune.serve.worker import Busy, Job  # noqa: E402

URL = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


class FakeRun:
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def request(self, conversation, *, max_new_tokens, sampling, variant, stop=None):
        self.calls.append({"run": self.name, "conversation": conversation, "max_new_tokens": max_new_tokens,
                           "sampling": sampling, "variant": variant, "stop": stop})
        if conversation[-1]["content"] == "refuse me":
            raise UserError("the template refuses this")
        return Request([1, 2, 3], max_new_tokens, sampling, variant, stop)


class FakeServed:
    def __init__(self):
        self.calls: list[dict] = []
        self.runs = {"a": FakeRun("a", self.calls), "b": FakeRun("b", self.calls)}
        self.variants = {"a": None, "b": None, "base": None}
        self.names = ["a", "b", "base"]


class FakeEngine:
    max_batch = 2


class FakeWorker:
    """Answers every request at once with ``outcome``: ("done", Answer fields) or ("error", (status, msg))."""

    def __init__(self):
        self.engine, self.in_flight, self.capacity = FakeEngine(), 0, 3
        self.outcome = ("done", {"text": "Hello there", "finish": "eos", "tokens": [5, 6]})
        self.too_long = self.busy = self.crash = False
        self.cancelled: list[Job] = []

    def check(self, request):
        if self.too_long:
            raise PromptTooLong("the prompt is 900 tokens; the model takes 512 tokens")

    def submit(self, request):
        if self.busy:
            raise Busy("3 requests in flight")
        if self.crash:
            raise RuntimeError("a bug")
        job = Job(request, asyncio.get_running_loop())
        kind, value = self.outcome
        if kind == "done":
            for piece in value["text"].split(" "):
                job.events.put_nowait(("text", piece))
            value = Answer(None, value["text"], value["tokens"], value["finish"], len(request.prompt_ids))
        job.events.put_nowait((kind, value))
        return job

    def cancel(self, job):
        self.cancelled.append(job)


@pytest.fixture
def app():
    served, worker = FakeServed(), FakeWorker()
    client = TestClient(build_app(served, worker, max_tokens=100), raise_server_exceptions=False)
    return client, served, worker


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and "Traceback" not in body["message"]
    assert body["type"] == ("invalid_request_error" if status < 500 else "server_error") or status == 429
    return body


# -- messages -> turns -----------------------------------------------------------------------------
def test_system_text_goes_in_front_of_the_first_user_turn_and_assistant_turns_stay(app):
    client, served, _ = app
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "system", "content": "Be kind."},
                {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "?"}]}]
    assert client.post(URL, json={"model": "a", "messages": messages}).status_code == 200
    assert served.calls[0]["conversation"] == [
        {"role": "user", "content": "Be brief.\n\nBe kind.\n\nHi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And?"}]


@pytest.mark.parametrize("roles", [["assistant", "user"], ["user", "assistant"], ["system"]])
def test_turns_must_start_and_end_with_the_user(app, roles):
    client, served, _ = app
    body = error(client.post(URL, json={"model": "a", "messages": [{"role": r, "content": "x"} for r in roles]}), 400)
    assert body["param"] == "messages"
    assert body["message"] == "messages must start and end with a user message (after any system messages)"
    assert not served.calls


def test_the_model_picks_the_run_and_base_uses_the_first_runs_template(app):
    client, served, _ = app
    for model in ("b", "base", "a"):
        assert client.post(URL, json={"model": model, "messages": HI}).status_code == 200
    assert [(c["run"], c["variant"]) for c in served.calls] == [("b", "b"), ("a", "base"), ("a", "a")]


# -- sampling fields ---------------------------------------------------------------------------------
def test_sampling_fields_override_the_defaults_one_by_one(app):
    client, served, _ = app
    client.post(URL, json={"model": "a", "messages": HI})
    client.post(URL, json={"model": "a", "messages": HI, "temperature": 0, "top_p": 0.5, "seed": 7})
    client.post(URL, json={"model": "a", "messages": HI, "temperature": 1.3})
    assert served.calls[0]["sampling"] == DEFAULTS
    assert served.calls[1]["sampling"] == DEFAULTS.with_(temperature=0.0, top_p=0.5, seed=7)
    assert served.calls[2]["sampling"] == DEFAULTS.with_(temperature=1.3)
    assert served.calls[1]["sampling"].repetition_penalty == DEFAULTS.repetition_penalty  # not an API field


@pytest.mark.parametrize("fields, budget", [({}, 100), ({"max_tokens": 7}, 7), ({"max_completion_tokens": 9}, 9),
                                            ({"max_tokens": 7, "max_completion_tokens": 9}, 9),
                                            ({"max_tokens": 10_000}, 100), ({"max_tokens": 100}, 100)])
def test_max_tokens_default_to_and_are_capped_by_the_server(app, fields, budget):
    client, served, _ = app
    assert client.post(URL, json={"model": "a", "messages": HI, **fields}).status_code == 200
    assert served.calls[0]["max_new_tokens"] == budget


@pytest.mark.parametrize("stop, expected", [(None, []), ("##", ["##"]), (["x", "y"], ["x", "y"])])
def test_stop_is_always_a_list(app, stop, expected):
    client, served, _ = app
    client.post(URL, json={"model": "a", "messages": HI, "stop": stop})
    assert served.calls[0]["stop"] == expected


# -- answers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("finish, reason", [("eos", "stop"), ("stop", "stop"), ("length", "length")])
def test_whole_answer_body(app, finish, reason):
    client, _, worker = app
    worker.outcome = ("done", {"text": "Hello there", "finish": finish, "tokens": [5, 6]})
    got = client.post(URL, json={"model": "b", "messages": HI}).json()
    assert got["object"] == "chat.completion" and got["model"] == "b" and got["id"].startswith("chatcmpl-")
    assert isinstance(got["created"], int)
    assert got["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                               "finish_reason": reason}]
    assert got["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def events(response) -> list:
    parts = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in parts) and parts[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in parts[:-1]]


@pytest.mark.parametrize("usage", [False, True])
def test_stream_chunks(app, usage):
    client, _, _ = app
    r = client.post(URL, json={"model": "a", "messages": HI, "stream": True, "stream_options": {"include_usage": usage}})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r)
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and all(c["object"] == "chat.completion.chunk" and c["model"] == "a" for c in chunks)
    assert all(isinstance(c["created"], int) for c in chunks)
    assert all(c["choices"][0]["index"] == 0 for c in chunks if c["choices"])
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hello"}, {"content": "there"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, None, None, "stop"]
    if usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 5
    else:
        assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("status", [400, 500, 503])
def test_engine_errors_reach_the_client(app, status):
    client, _, worker = app
    worker.outcome = ("error", (status, "the server is shutting down"))
    body = error(client.post(URL, json={"model": "a", "messages": HI}), status)
    assert body["message"] == "the server is shutting down" and body["param"] is None
    streamed = events(client.post(URL, json={"model": "a", "messages": HI, "stream": True}))
    assert streamed[-1] == {"error": body}  # after the status line: an error event, then [DONE]
    assert all(not c.get("choices") or c["choices"][0]["finish_reason"] is None for c in streamed[:-1])


# -- errors ----------------------------------------------------------------------------------------------
def test_request_errors_map_to_openai_bodies(app):
    client, served, worker = app
    post = lambda **kw: client.post(URL, json={"model": "a", "messages": HI, **kw})  # noqa: E731
    assert error(post(n=2), 400)["param"] == "n"
    missing = error(post(model="nope"), 404)
    assert missing["code"] == "model_not_found" and missing["param"] == "model" and "a, b, base" in missing["message"]
    refused = error(post(messages=[{"role": "user", "content": "refuse me"}]), 400)
    assert refused["param"] == "messages" and refused["message"] == "the template refuses this"
    worker.too_long = True
    too_long = error(post(), 400)
    assert too_long["code"] == "context_length_exceeded" and too_long["param"] == "messages"
    worker.too_long, worker.busy = False, True
    busy = client.post(URL, json={"model": "a", "messages": HI})
    assert error(busy, 429)["type"] == "rate_limit_error" and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "server_busy"
    worker.busy, worker.crash = False, True
    assert error(post(), 500)["message"] == "internal error (RuntimeError)"


@pytest.mark.parametrize("field, value", [("temperature", 2.5), ("temperature", -1), ("top_p", 0), ("max_tokens", 0),
                                          ("messages", []), ("stop", ["1", "2", "3", "4", "5"])])
def test_validation_errors_name_the_field(app, field, value):
    client, served, _ = app
    body = error(client.post(URL, json={"model": "a", "messages": HI, field: value}), 400)
    # a union field names the member it tried: 'stop.str'
    assert body["param"].split(".")[0] == field and body["message"].startswith(f"'{body['param']}': ")
    assert body["code"]
    assert not served.calls


def test_malformed_json_unknown_routes_and_large_bodies(app):
    client, _, _ = app
    bad = error(client.post(URL, content=b'{"model": ', headers={"content-type": "application/json"}), 400)
    assert bad["message"].startswith("malformed JSON") and bad["param"] is None
    assert error(client.get("/nowhere"), 404)["message"] == "Not Found"
    assert error(client.post(URL, content=b"x" * (MAX_BODY + 1), headers={"content-type": "application/json"}),
                 413)["code"] == "request_too_large"
    chunked = client.post(URL, content=iter([b"x" * MAX_BODY, b"x"]), headers={"content-type": "application/json"})
    assert error(chunked, 413)["code"] == "request_too_large"
    exact = json.dumps({"model": "a", "messages": HI}).encode()
    assert client.post(URL, content=iter([exact[:5], exact[5:]]), headers={"content-type": "application/json"}).status_code == 200


def test_api_key(app):
    _, served, worker = app
    client = TestClient(build_app(served, worker, max_tokens=100, api_key="s3cret"))
    assert error(client.get("/v1/models"), 401)["code"] == "invalid_api_key"
    assert error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert error(client.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401)
    ok = client.get("/v1/models", headers={"Authorization": "bearer s3cret"})
    assert [m["id"] for m in ok.json()["data"]] == ["a", "b", "base"]
    assert client.get("/health").json() == {"status": "ok", "models": ["a", "b", "base"], "in_flight": 0,
                                            "max_batch": 2, "capacity": 3}


# -- any OpenAI-shaped request (property) ---------------------------------------------------------------
text = st.text(max_size=8)
content = st.one_of(text, st.lists(st.builds(lambda t: {"type": "text", "text": t}, text), max_size=3))
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": content})


@settings(max_examples=150, deadline=None)
@given(st.lists(message, min_size=1, max_size=7))
def test_any_openai_messages_map_to_turns_that_start_and_end_with_the_user(raw):
    messages = [Message(**m) for m in raw]
    said = [m for m in messages if m.role != "system"]
    try:
        turns = _conversation(messages)
    except ApiError as e:
        assert e.status == 400 and e.param == "messages"
        assert not said or said[0].role != "user" or said[-1].role != "user"
        return
    assert turns[0]["role"] == "user" == turns[-1]["role"]
    assert [t["role"] for t in turns] == [m.role for m in said]
    assert [t["content"] for t in turns[1:]] == [m.text for m in said[1:]]
    system = "\n\n".join(m.text for m in messages if m.role == "system")
    assert turns[0]["content"] == (f"{system}\n\n{said[0].text}" if system else said[0].text)


# -- the app's plumbing --------------------------------------------------------------------------------
def test_models_page_docs_and_lifespan(app):
    _, served, worker = app
    with TestClient(build_app(served, worker, max_tokens=100)) as client:  # runs the lifespan through the middleware
        models = client.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["a", "b", "base"]
        assert all(set(m) == {"id", "object", "created", "owned_by"} and m["object"] == "model"
                   and isinstance(m["created"], int) and m["owned_by"] == "chattune" for m in models["data"])
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "<" in page.text
        for hidden in ("/docs", "/redoc", "/openapi.json"):  # no schema or docs pages
            assert client.get(hidden).status_code == 404
        for method in ("PUT", "PATCH"):  # any method with a body is limited
            big = client.request(method, URL, content=b"x" * (MAX_BODY + 1), headers={"content-type": "application/json"})
            assert error(big, 413)["code"] == "request_too_large", method
        for body in (b"x" * MAX_BODY, iter([b"x" * (MAX_BODY - 1), b"x"])):  # the limit itself is allowed
            assert error(client.post(URL, content=body, headers={"content-type": "application/json"}), 400)


def test_cors_preflight_allows_the_api_methods_and_headers(app):
    _, served, worker = app
    client = TestClient(build_app(served, worker, max_tokens=100, cors_origins=["http://app.example"]))
    asks = {"Origin": "http://app.example", "Access-Control-Request-Headers": "Authorization, Content-Type"}
    for method in ("GET", "POST"):
        r = client.options(URL, headers={**asks, "Access-Control-Request-Method": method})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example", method
    assert client.options(URL, headers={**asks, "Access-Control-Request-Method": "DELETE"}).status_code == 400


def test_api_key_message_and_spacing(app):
    _, served, worker = app
    client = TestClient(build_app(served, worker, max_tokens=100, api_key="s3cret"))
    body = error(client.get("/v1/models"), 401)
    assert body["message"] == "missing or wrong API key (send 'Authorization: Bearer <key>')"
    assert client.get("/v1/models", headers={"Authorization": "Bearer  s3cret "}).status_code == 200


def job_with(*events) -> Job:
    job = Job(Request([1]), asyncio.get_running_loop())
    for e in events:
        job.events.put_nowait(e)
    return job


def test_a_finished_stream_is_not_cancelled_and_a_dropped_one_is():
    async def go():
        worker = FakeWorker()
        done = job_with(("done", Answer(None, "x", [1], "eos", 1)))
        chunks = [c async for c in _stream(done, worker, Reply("a"), False)]
        assert chunks[-1] == "data: [DONE]\n\n" and worker.cancelled == []
        dropped = job_with(("text", "x"))
        stream = _stream(dropped, worker, Reply("a"), False)
        await stream.__anext__()  # the role chunk, then the client goes away
        await stream.aclose()
        assert worker.cancelled == [dropped]

    asyncio.run(go())


def test_a_whole_answer_whose_client_left_is_cancelled():
    class Gone:
        async def is_disconnected(self):
            return True

    async def go():
        worker = FakeWorker()
        job = job_with()
        response = await asyncio.wait_for(_whole(job, worker, Reply("a"), Gone()), timeout=5)
        assert response.status_code == 499 and response.body == b"{}" and worker.cancelled == [job]

    asyncio.run(go())


def test_a_whole_answer_slower_than_the_poll_still_arrives():
    class Here:
        async def is_disconnected(self):
            return False

    async def go():
        worker, job = FakeWorker(), job_with()
        asyncio.get_running_loop().call_later(0.8, job.events.put_nowait, ("done", Answer(None, "late", [1], "eos", 1)))
        body = await asyncio.wait_for(_whole(job, worker, Reply("a"), Here()), timeout=5)
        assert body["choices"][0]["message"]["content"] == "late" and worker.cancelled == []

    asyncio.run(go())


def test_an_api_error_reads_as_its_message():
    assert str(ApiError(400, "bad things", param="messages")) == "bad things"
