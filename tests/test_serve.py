"""chattune serve: a live server on 127.0.0.1 with two tiny runs, driven by the openai client.

The main server is the real command in a subprocess (first line, SIGTERM, exit codes);
the API-key, queue-full and disconnect tests run the same app in-process, where the
engine's answers can be watched.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

openai = pytest.importorskip("openai", reason="needs the serve extra: pip install 'chattune[serve]'")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'chattune[serve]'")
pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'chattune[serve]'")

from chattune.cli import main  # noqa: E402
from chattune.engine import DEFAULTS, Engine  # noqa: E402
from chattune.serve.app import build_app  # noqa: E402
from chattune.serve.models import load_served  # noqa: E402
from chattune.serve.worker import Worker  # noqa: E402
from tiny import tiny_dirs  # noqa: E402,F401  (fixture)

PROMPT = "What is the capital of Italy?"


@pytest.fixture(scope="module")
def runs(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs on one GPT-2 base: LoRA (a PEFT tuner) and prefix tuning (prompt learning)."""
    root = tmp_path_factory.mktemp("serve")
    out = {}
    for name, method in (("lora", "lora"), ("pre", "prefix")):
        out[name] = root / name
        assert main(["train", "--model", str(tiny_dirs["gpt2"]), "--method", method, "--max-steps", "2",
                     "--lr", "0.05", "--output-dir", str(out[name]), "--max-length", "128"]) == 0
    return out


def _first_line(proc: subprocess.Popen, timeout: float = 120) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert box and box[0], f"no first line from the server; stderr: {proc.stderr.read() if proc.poll() else ''}"
    return box[0]


@pytest.fixture(scope="module")
def server(runs):
    cmd = [sys.executable, "-m", "chattune.cli", "serve", f"lora={runs['lora']}", f"pre={runs['pre']}",
           "--port", "0", "--max-batch", "16", "--max-queue", "64", "--max-tokens", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = _first_line(proc)
    url = line.split()[2]
    yield {"proc": proc, "line": line, "url": url.rstrip("/")}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def chat_cli(run: Path, capsys, *extra: str) -> str:
    """What `chattune chat RUN --prompt ... --temperature 0` prints (its trailing newline removed)."""
    assert main(["chat", str(run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "12", *extra]) == 0
    return capsys.readouterr().out[:-1]


def ask(c: openai.OpenAI, model: str, **kw):
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                     temperature=0, max_tokens=12, **kw)


# -- the subprocess server -------------------------------------------------------------------------
def test_first_line_names_url_and_models(server):
    assert server["line"].startswith("chattune serve: http://127.0.0.1:")
    assert server["line"].rstrip().endswith("models: lora, pre, base")
    assert [m.id for m in client(server["url"]).models.list()] == ["lora", "pre", "base"]
    assert httpx.get(f"{server['url']}/health").json()["status"] == "ok"


def test_each_run_answers_like_chattune_chat(server, runs, capsys):
    c = client(server["url"])
    answers = {}
    for model, run, extra in (("lora", runs["lora"], ()), ("pre", runs["pre"], ()), ("base", runs["lora"], ("--base",))):
        got = ask(c, model)
        answers[model] = got.choices[0].message.content
        assert answers[model] == chat_cli(run, capsys, *extra), model
        assert got.choices[0].finish_reason in ("stop", "length")
        assert got.usage.completion_tokens > 0 and got.usage.prompt_tokens > 0
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert len(set(answers.values())) == 3, answers  # the runs really answer with their own methods


def test_streaming_equals_the_whole_answer(server):
    c = client(server["url"])
    whole = ask(c, "pre").choices[0].message.content
    chunks = list(ask(c, "pre", stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0
    raw = httpx.post(f"{server['url']}/v1/chat/completions", json={
        "model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_and_seeds(server):
    c = client(server["url"])
    whole = ask(c, "lora").choices[0].message.content
    stop = whole[len(whole) // 2:][:3]
    cut = ask(c, "lora", stop=[stop])
    assert cut.choices[0].message.content == whole[:whole.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [c.chat.completions.create(model="pre", messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
                                         temperature=1.0, seed=seed).choices[0].message.content for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_messages_with_system_and_assistant_turns(server, served):
    """The system text goes in front of the first user turn and earlier answers stay: the
    prompt the server decodes has exactly the tokens of that conversation."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": [{"type": "text", "text": "And?"}]}]
    got = client(server["url"]).chat.completions.create(model="lora", max_tokens=4, temperature=0, messages=messages)
    turns = [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "And?"}]
    expected = served.runs["lora"].request(turns, max_new_tokens=4)
    assert got.usage.prompt_tokens == len(expected.prompt_ids)
    without_system = [{"role": "user", "content": "Hi"}, *turns[1:]]
    assert len(served.runs["lora"].request(without_system, max_new_tokens=4).prompt_ids) < got.usage.prompt_tokens
    engine = Engine(served.variants, served.tokenizer, served.tokenizer.eos_token_id)
    answer = engine.run([replace(expected, sampling=DEFAULTS.with_(temperature=0.0), variant="lora")])[0]
    assert got.choices[0].message.content == answer.text


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and "Traceback" not in body["message"]
    return body


def test_bad_requests_get_openai_error_bodies(server):
    url, ok = f"{server['url']}/v1/chat/completions", {"model": "lora", "messages": [{"role": "user", "content": "hi"}]}
    post = lambda **kw: httpx.post(url, timeout=30, **kw)  # noqa: E731
    assert "malformed JSON" in _error(post(content=b'{"model": ', headers={"content-type": "application/json"}),
                                      400)["message"]
    assert _error(post(json={"messages": ok["messages"]}), 400)["param"] == "model"
    assert _error(post(json={**ok, "temperature": "hot"}), 400)["param"] == "temperature"
    assert _error(post(json={**ok, "messages": "hi"}), 400)["param"] == "messages"
    assert _error(post(json={**ok, "n": 2}), 400)["param"] == "n"
    assert _error(post(json={**ok, "model": "nope"}), 404)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client(server["url"]).chat.completions.create(model="nope", messages=ok["messages"])
    long = {**ok, "messages": [{"role": "user", "content": "a b " * 600}]}
    body = _error(post(json=long), 400)
    assert body["code"] == "context_length_exceeded" and "512 tokens" in body["message"]
    assert _error(post(content=b"x" * ((1 << 20) + 1), headers={"content-type": "application/json"}), 413)
    assert _error(httpx.get(f"{server['url']}/nowhere"), 404)
    assert post(json={**ok, "max_tokens": 2}).status_code == 200  # still serving


def test_max_tokens_is_capped_by_the_server(server):
    got = client(server["url"]).chat.completions.create(
        model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=10_000, temperature=0)
    assert got.usage.completion_tokens <= 64  # --max-tokens 64


def test_32_concurrent_streams_all_complete(server):
    c = client(server["url"])

    def one(i: int) -> tuple[str, str]:
        stream = c.chat.completions.create(model=("lora", "pre", "base")[i % 3], stream=True, max_tokens=4,
                                           messages=[{"role": "user", "content": f"Question {i}?"}])
        chunks = [ch for ch in stream if ch.choices]
        return "".join(ch.choices[0].delta.content or "" for ch in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert len(results) == 32 and all(finish in ("stop", "length") for _, finish in results)


def test_sigterm_finishes_in_flight_requests_and_exits_0(server):
    """Runs last in this module: it stops the module's server."""
    proc, url = server["proc"], server["url"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    # the in-flight answer was finished, not failed: [DONE] also follows an error event
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
    chunks = [json.loads(line[len("data: "):]) for line in rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert sum(bool(c["choices"][0]["delta"].get("content")) for c in chunks) >= 2  # it went on after SIGTERM
    assert proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)


# -- in-process servers: API key, queue full, disconnect -----------------------------------------------
@pytest.fixture(scope="module")
def served(runs):
    return load_served([f"lora={runs['lora']}", f"pre={runs['pre']}"])


class SlowEngine(Engine):
    """Ends rows only at their token budget (no EOS, no stop strings) and sleeps between
    steps, so an answer lasts as long as a test needs."""

    def add(self, request):
        request.stop = []
        return super().add(request)

    def step(self):
        time.sleep(0.01)
        return super().step()


@contextlib.contextmanager
def live(served, *, max_batch=4, max_queue=8, slow=False, **app_kw):
    answers = []

    def make_engine():
        cls = SlowEngine if slow else Engine
        return cls(served.variants, served.tokenizer, -1 if slow else served.tokenizer.eos_token_id, max_batch=max_batch)

    worker = Worker(make_engine, max_queue)
    finish = worker._finish
    worker._finish = lambda job, kind, value: (answers.append(value), finish(job, kind, value))
    worker.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(build_app(served, worker, max_tokens=400, **app_kw), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", worker, answers
    finally:
        server.should_exit = True
        thread.join(30)
        worker.stop(10)
        sock.close()


def test_api_key_is_required_when_configured(served):
    with live(served, api_key="s3cret") as (url, _, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert _error(httpx.post(f"{url}/v1/chat/completions", json={}), 401)["code"] == "invalid_api_key"
        assert [m.id for m in client(url, "s3cret").models.list()] == ["lora", "pre", "base"]
        assert httpx.get(f"{url}/health").status_code == 200  # health and the page stay open
        assert ask(client(url, "s3cret"), "lora").choices[0].message.content


def test_no_cors_headers_unless_an_origin_is_given(served):
    with live(served) as (url, _, _):
        r = httpx.options(f"{url}/v1/models", headers={"Origin": "http://evil.example",
                                                       "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in r.headers
    with live(served, cors_origins=["http://app.example"]) as (url, _, _):
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "http://app.example"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"


def _open_stream(url: str, model: str = "lora", max_tokens: int = 400):
    """A streaming request that has started answering; close the returned stack to disconnect."""
    stack = contextlib.ExitStack()
    http = stack.enter_context(httpx.Client(timeout=60))
    r = stack.enter_context(http.stream("POST", f"{url}/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": True}))
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
    stack.callback(lines.close)  # holds the generator: dropping it would close the response
    return stack


def _wait(predicate, timeout: float = 20) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "timed out"
        time.sleep(0.02)


def test_queue_full_gets_429_and_a_disconnect_frees_its_slot(served):
    with live(served, max_batch=1, max_queue=0, slow=True) as (url, worker, answers):
        first = _open_stream(url)  # takes the only slot, for 400 slow steps
        busy = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "pre", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert _error(busy, 429)["type"] == "rate_limit_error" and busy.headers["retry-after"] == "1"
        first.close()  # the client goes away mid-stream
        _wait(lambda: worker.in_flight == 0, timeout=10)
        cancelled = [a for a in answers if getattr(a, "finish_reason", None) == "cancelled"]
        assert len(cancelled) == 1 and len(cancelled[0].token_ids) < 400
        assert worker.engine.active == 0
        ok = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "pre", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200, ok.text


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package (apt-get install -y chromium)")
def test_chat_page_in_headless_chromium(served, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright from PyPI (the test extra)")
    with live(served) as (url, _, _), playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 390, "height": 800})  # a phone-width screen
        page.goto(url + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        page.select_option("#model", "pre")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        page.fill("#input", PROMPT)
        page.click("#send")
        answer = page.locator(".msg.assistant .meta")  # written when the stream has ended
        answer.wait_for(timeout=60_000)
        streamed = page.evaluate("document.querySelector('.msg.assistant .md').dataset.markdown")
        meta = answer.inner_text()
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        width = page.evaluate("document.documentElement.scrollWidth")
        browser.close()
        expected = client(url).chat.completions.create(model="pre", temperature=0, max_tokens=8, messages=[
            {"role": "user", "content": PROMPT}]).choices[0].message.content
    assert streamed == expected and meta.startswith("pre")
    assert width <= 390  # nothing overflows sideways on a phone
    assert (tmp_path / "chat.png").stat().st_size > 1000


# -- command line ------------------------------------------------------------------------------------
def test_runs_on_different_bases_are_refused(runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(runs["lora"], other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["name"] = "some/other-model"
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["serve", str(runs["lora"]), str(other), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "share one base model" in err and "some/other-model" in err


def test_the_adapter_directory_is_what_peft_loads(runs):
    """PEFT's own files and key names, nothing else (what LoRA servers such as vLLM read;
    their further rules are not checked here)."""
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
    from safetensors import safe_open

    from chattune.models.loading import load_model

    adapter = runs["lora"] / "adapter"
    files = {p.name for p in adapter.iterdir()}
    # PEFT's model card (README.md) rides along; no pickles, no optimiser state, no other weights
    assert files - {"README.md"} == {"adapter_config.json", "adapter_model.safetensors"}
    config = PeftConfig.from_pretrained(adapter)
    expected = get_peft_model_state_dict(get_peft_model(load_model(config.base_model_name_or_path), config))
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert set(f.keys()) == set(expected)
        assert all(f.get_slice(k).get_shape() == list(expected[k].shape) for k in f.keys())


def test_unset_api_key_variable_is_refused(runs, monkeypatch, capsys):
    monkeypatch.delenv("CHATTUNE_TEST_KEY", raising=False)
    assert main(["serve", str(runs["lora"]), "--port", "0", "--api-key-env", "CHATTUNE_TEST_KEY"]) == 2
    assert "CHATTUNE_TEST_KEY is not set" in capsys.readouterr().err
