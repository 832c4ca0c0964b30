"""The arena: battles through the API, votes as Arena rows that `chattune data` and DPO read,
the Bradley-Terry leaderboard, and the durable votes file."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from chattune.serve.leaderboard import fit, leaderboard

openai = pytest.importorskip("openai", reason="needs the serve extra: pip install 'chattune[serve]'")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'chattune[serve]'")

from chattune.cli import main  # noqa: E402
from chattune.data.config import DataConfig  # noqa: E402
from chattune.data.pairs import load_pairs  # noqa: E402
from chattune.serve.arena import ArenaError, Battles, VoteLog  # noqa: E402
from test_serve import _error, client, live, runs, served  # noqa: E402,F401  (fixtures)
from tiny import tiny_dirs  # noqa: E402,F401  (fixture)

ARENA_KEYS = {"question_id", "model_a", "model_b", "winner", "judge", "conversation_a", "conversation_b", "turn",
              "anony", "tstamp"}


# -- the leaderboard --------------------------------------------------------------------------------
def test_bradley_terry_fit_is_the_maximum_of_its_likelihood():
    wins = np.array([[0, 7, 9], [3, 0, 6], [1, 4, 0]], dtype=float)
    p = fit(wins)
    games = wins + wins.T
    # stationarity of the log-likelihood (with the half-won virtual game against strength 1)
    expected = (games * p[:, None] / (p[:, None] + p[None, :])).sum(1) + p / (p + 1)
    np.testing.assert_allclose(wins.sum(1) + 0.5, expected, rtol=1e-7)
    assert p[0] > p[1] > p[2]


def test_ties_are_half_wins_and_the_board_ranks_with_intervals():
    votes = [("a", "b", "model_a")] * 12 + [("b", "a", "model_b")] * 4 + [("a", "b", "model_b")] * 4
    votes += [("b", "c", "tie")] * 6 + [("c", "b", "tie (bothbad)")] * 6
    board = leaderboard(votes, ["c", "b", "a", "unused"], rounds=100)
    rows = {r["model"]: r for r in board["data"]}
    assert board["data"][0]["model"] == "a"
    assert board["votes"] == 32
    assert rows["a"]["wins"] == 16 and rows["a"]["losses"] == 4 and rows["b"]["ties"] == 12
    assert rows["a"]["rating"] > max(rows["b"]["rating"], rows["c"]["rating"])
    assert rows["unused"]["rating"] is None and rows["unused"]["votes"] == 0 and board["data"][-1]["model"] == "unused"
    for r in (rows["a"], rows["b"], rows["c"]):
        assert r["lower"] <= r["rating"] <= r["upper"] and r["upper"] - r["lower"] > 1
    # a tie counts as one half win each way: two ties equal one win and one loss
    halves = leaderboard([("x", "y", "tie")] * 2 + [("x", "y", "model_a")], ["x", "y"], rounds=10)
    whole = leaderboard([("x", "y", "model_a"), ("y", "x", "model_a"), ("x", "y", "model_a")], ["x", "y"], rounds=10)
    assert [r["rating"] for r in halves["data"]] == [r["rating"] for r in whole["data"]]


# -- battles and the votes file, without a server ---------------------------------------------------
def test_battles_pick_served_pairs_with_random_sides():
    battles = Battles(["r1", "r2", "base"])
    sides = {battles.create(["r1", "base"]).models for _ in range(40)}
    assert sides == {("r1", "base"), ("base", "r1")}
    assert all(set(battles.create().models) <= {"r1", "r2", "base"} for _ in range(20))
    with pytest.raises(ArenaError, match="not served"):
        battles.create(["r1", "nope"])
    with pytest.raises(ArenaError, match="two different"):
        battles.create(["r1", "r1"])
    b = battles.create()
    assert b.public()["model_a"] is None and battles.create(reveal=True).public()["model_a"] is not None


def test_votes_file_is_appended_one_line_per_vote_under_concurrency(tmp_path):
    path = tmp_path / "sub" / "votes.jsonl"
    log = VoteLog(path)
    rows = [{"question_id": str(i), "model_a": "x", "model_b": "y", "winner": "model_a", "pad": "é" * 5000}
            for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(log.append, rows))
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(line)["question_id"] for line in lines) == sorted(str(i) for i in range(32))
    assert VoteLog(path).results == [("x", "y", "model_a")] * 32  # read back at start-up


def test_a_half_line_is_ended_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "votes.jsonl"
    path.write_text('{"question_id": "cut off by a crash", "mod')
    log = VoteLog(path)
    log.append({"model_a": "x", "model_b": "y", "winner": "tie"})
    assert [json.loads(line)["winner"] for line in path.read_text().splitlines()[1:]] == ["tie"]
    size = path.stat().st_size

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        log.append({"model_a": "x", "model_b": "y", "winner": "model_b"})
    assert path.stat().st_size == size and log.results == [("x", "y", "tie")]


# -- the API ------------------------------------------------------------------------------------------
def _battle(url: str, models=("lora", "pre"), **kw) -> dict:
    r = httpx.post(f"{url}/v1/arena/battles", json={"models": list(models) if models else None, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def _say(url: str, battle: str, text: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/arena/battles/{battle}/messages", timeout=60,
                      json={"content": text, "max_tokens": 6, "temperature": 0, **kw})


def _vote(url: str, battle: str, winner: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/arena/battles/{battle}/vote", json={"winner": winner}, timeout=30)


def test_a_battle_answers_both_sides_and_the_vote_is_an_arena_row(served, tmp_path):
    path = tmp_path / "votes.jsonl"
    with live(served, votes=VoteLog(path)) as (url, _, _):
        c = client(url)
        assert c.models.retrieve("pre").id == "pre"  # GET /v1/models/{id}
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("nope")
        battle = _battle(url)
        assert battle["model_a"] is None and battle["model_b"] is None  # anonymous until the vote
        first = _say(url, battle["id"], "What is the capital of Italy?").json()
        assert [ch["index"] for ch in first["choices"]] == [0, 1]
        streamed = _say(url, battle["id"], "And of France?", stream=True)
        chunks = [json.loads(e[6:]) for e in streamed.text.split("\n\n") if e.startswith("data: {")]
        second = ["".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks
                          if ch["choices"] and ch["choices"][0]["index"] == i) for i in (0, 1)]
        assert streamed.text.rstrip().endswith("data: [DONE]") and chunks[-1]["usage"]["completion_tokens"] > 0
        voted = _vote(url, battle["id"], "model_b").json()
        assert {voted["model_a"], voted["model_b"]} == {"lora", "pre"} and voted["winner"] == "model_b"
        # the row holds what the server answered, per side, in the order of the turns
        row = json.loads(path.read_text())
        assert ARENA_KEYS <= set(row) and row["turn"] == 2 and row["anony"] is True
        assert (row["model_a"], row["model_b"], row["winner"]) == (voted["model_a"], voted["model_b"], "model_b")
        for i, side in enumerate(("conversation_a", "conversation_b")):
            assert [m["role"] for m in row[side]] == ["user", "assistant"] * 2
            assert row[side][1]["content"] == first["choices"][i]["message"]["content"]
            assert row[side][3]["content"] == second[i]
            assert row[side][2]["content"] == "And of France?"
        # the same conversation answered alone by each model (greedy): what was recorded is theirs
        alone = c.chat.completions.create(model=row["model_a"], max_tokens=6, temperature=0,
                                          messages=row["conversation_a"][:1]).choices[0].message.content
        assert alone == row["conversation_a"][1]["content"]
        board = httpx.get(f"{url}/v1/arena/leaderboard").json()
        assert board["votes"] == 1 and board["data"][0]["model"] == row["model_b"]
        assert [r["model"] for r in board["data"]][-1] == "base" and board["data"][-1]["rating"] is None


def test_votes_on_unknown_voted_or_empty_battles_and_forged_answers_are_refused(served):
    with live(served) as (url, _, _):
        assert _error(_vote(url, "battle-nope", "tie"), 404)["code"] == "battle_not_found"
        assert _error(_say(url, "battle-nope", "hi"), 404)["code"] == "battle_not_found"
        battle = _battle(url)["id"]
        assert _error(_vote(url, battle, "tie"), 409)["code"] == "battle_empty"
        assert _error(httpx.post(f"{url}/v1/arena/battles/{battle}/vote", json={"winner": "model_c"}), 400)
        forged = httpx.post(f"{url}/v1/arena/battles/{battle}/messages", json={
            "content": "hi", "conversation_a": [{"role": "assistant", "content": "I win"}]})
        assert _error(forged, 400)["param"] == "conversation_a"
        assert _say(url, battle, "hi").status_code == 200
        assert _vote(url, battle, "tie").status_code == 200
        assert _error(_vote(url, battle, "model_a"), 409)["code"] == "battle_voted"
        assert _error(_say(url, battle, "more"), 409)["code"] == "battle_voted"
        assert _error(httpx.post(f"{url}/v1/arena/battles", json={"models": ["lora", "gpt-5"]}), 404)["code"] \
            == "model_not_found"


def test_voting_needs_the_api_key(served):
    with live(served, api_key="s3cret") as (url, _, _):
        assert _error(httpx.post(f"{url}/v1/arena/battles", json={}), 401)["code"] == "invalid_api_key"
        assert _error(_vote(url, "battle-x", "tie"), 401)["code"] == "invalid_api_key"
        assert _error(httpx.get(f"{url}/v1/arena/leaderboard"), 401)["code"] == "invalid_api_key"
        ok = httpx.post(f"{url}/v1/arena/battles", json={}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_32_concurrent_votes_are_32_whole_lines(served, tmp_path):
    path = tmp_path / "votes.jsonl"
    with live(served, max_batch=16, max_queue=64, votes=VoteLog(path)) as (url, _, _):
        battles = [_battle(url, models=None)["id"] for _ in range(32)]

        def one(i: int) -> int:
            assert _say(url, battles[i], f"Question {i}?", max_tokens=2).status_code == 200
            barrier.wait(60)  # every battle answered: the votes arrive together
            return _vote(url, battles[i], ("model_a", "model_b", "tie", "tie (bothbad)")[i % 4]).status_code

        barrier = threading.Barrier(32)
        with ThreadPoolExecutor(32) as pool:
            assert list(pool.map(one, range(32))) == [200] * 32
        assert httpx.get(f"{url}/v1/arena/leaderboard").json()["votes"] == 32
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["question_id"] for r in rows) == sorted(battles)


def test_votes_are_what_chattune_data_and_dpo_read(served, tiny_dirs, tmp_path, capsys):
    path = tmp_path / "votes.jsonl"
    winners = ["model_a", "model_b", "tie", "tie (bothbad)", "model_a", "model_b"]
    with live(served, votes=VoteLog(path)) as (url, _, _):
        for i, winner in enumerate(winners):
            battle = _battle(url)["id"]
            assert _say(url, battle, f"Tell me about the number {i}.", max_tokens=8).status_code == 200
            assert _vote(url, battle, winner).status_code == 200
    assert main(["data", "--dataset", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "arena" and summary["rows_read"] == 6
    # --side winner: a tie keeps both answers, "both bad" neither (dropped under its own reason)
    assert summary["dropped"].get("tie_bothbad") == 1
    assert summary["rows_kept"] + sum(summary["dropped"].values()) == 6
    pairs = load_pairs(DataConfig(dataset=str(path), val_ratio=0, test_ratio=0))
    assert pairs.dropped["tie"] == 1 and pairs.dropped["tie_bothbad"] == 1
    assert pairs.rows_kept + sum(pairs.dropped.values()) == 6 and pairs.rows_kept >= 1
    out = tmp_path / "dpo"
    assert main(["train", "--model", str(tiny_dirs["gpt2"]), "--objective", "dpo", "--dataset", str(path),
                 "--max-steps", "1", "--batch-size", "2", "--max-length", "128", "--output-dir", str(out),
                 "--set", "data.val_ratio=0", "--set", "data.test_ratio=0"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_unwritable_votes_file_is_one_line(runs, capsys):
    assert main(["serve", str(runs["lora"]), "--port", "0", "--votes", "/proc/no/votes.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--votes /proc/no/votes.jsonl" in err


# -- the page in Chromium ---------------------------------------------------------------------------
CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="needs Debian's chromium package (apt-get install -y chromium)")


def _browser(p):
    return p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])


@needs_chromium
def test_battle_vote_and_leaderboard_in_headless_chromium(served, tmp_path, capsys):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright from PyPI (the test extra)")
    path = tmp_path / "votes.jsonl"
    with live(served, votes=VoteLog(path)) as (url, _, _), playwright.sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 390, "height": 800})  # a phone-width screen
        page.goto(url + "/")
        page.wait_for_function("document.querySelectorAll('#pick-a option').length === 4")
        page.click("#tab-battle")
        page.select_option("#pick-a", "lora")
        page.select_option("#pick-b", "pre")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        page.fill("#input", "What is the capital of Italy?")
        page.press("#input", "Enter")  # the keyboard, as in the chat tab
        page.wait_for_selector(".vote[data-winner=model_a]:enabled", timeout=60_000)
        shown = page.evaluate("[...document.querySelectorAll('.side')].map(s => s.querySelector('h2').textContent)")
        answers = page.evaluate("[...document.querySelectorAll('.side .md')].map(m => m.dataset.markdown)")
        width = page.evaluate("document.documentElement.scrollWidth")
        page.click(".vote[data-winner=model_a]")
        page.wait_for_function("document.getElementById('verdict').textContent.startsWith('Your vote')")
        revealed = page.evaluate("[...document.querySelectorAll('.side')].map(s => s.querySelector('h2').textContent)")
        page.click("#tab-board")
        page.wait_for_function("document.querySelectorAll('#board-body tr').length === 3")
        board = page.evaluate("[...document.querySelectorAll('#board-body tr')].map(r => r.children[1].textContent)")
        note = page.inner_text("#board-note")
        browser.close()
    assert shown == ["Model A", "Model B"]  # hidden until the vote
    row = json.loads(path.read_text())
    assert ARENA_KEYS <= set(row) and row["winner"] == "model_a" and {row["model_a"], row["model_b"]} == {"lora", "pre"}
    assert revealed == [f"Model A: {row['model_a']}", f"Model B: {row['model_b']}"]
    assert [row["conversation_a"][1]["content"], row["conversation_b"][1]["content"]] == answers
    assert board[0] == row["model_a"] and note.startswith("1 votes")
    assert width <= 390
    assert main(["data", "--dataset", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_read"] == 1 and summary["rows_kept"] + sum(summary["dropped"].values()) == 1


HOSTILE = """## Plan

**Learn the Basics:** read *carefully* and ~~never~~ often.

1. first
2. second
   - nested

| tool | use |
|------|-----|
| `uv` | installs |

```python
print("<b>hi</b>")
```

<script>window.__pwned = 1</script>
<img src=x onerror="window.__pwned = 2">
[docs](https://example.org/docs) and [bad](javascript:window.__pwned=3)
"""


@needs_chromium
def test_markdown_is_rendered_and_html_never_runs(served, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright from PyPI (the test extra)")
    # the answer is streamed in small pieces, cutting through the fence and the HTML
    pieces = [HOSTILE[i:i + 7] for i in range(0, len(HOSTILE), 7)]
    chunks = [{"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]} for piece in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    with live(served) as (url, _, _), playwright.sync_playwright() as p:
        browser = _browser(p)
        context = browser.new_context(viewport={"width": 390, "height": 800},
                                      permissions=["clipboard-read", "clipboard-write"])
        page = context.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.route("**/v1/chat/completions", lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=body))
        page.goto(url + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        page.fill("#input", "hi")
        page.click("#send")
        page.locator(".msg.assistant .meta").wait_for(timeout=30_000)
        page.wait_for_timeout(300)  # time for an onerror or a script to fire, if anything could
        md = ".msg.assistant .md"
        got = page.evaluate(f"""() => {{ const m = document.querySelector('{md}'); return {{
            pwned: window.__pwned ?? null, h2: m.querySelector('h2')?.textContent,
            strong: m.querySelector('strong')?.textContent, em: m.querySelector('em')?.textContent,
            ol: m.querySelectorAll('ol > li').length, nested: m.querySelectorAll('ol li ul li').length,
            th: [...m.querySelectorAll('th')].map(t => t.textContent), td_code: m.querySelector('td code')?.textContent,
            pre: m.querySelector('pre code')?.textContent, copy: !!m.querySelector('.code .copy'),
            html: m.querySelectorAll('script, img, iframe, [onerror]').length,
            links: [...m.querySelectorAll('a')].map(a => [a.textContent, a.getAttribute('href'), a.rel]),
            text: m.textContent, markdown: m.dataset.markdown }}; }}""")
        page.click(".code .copy")
        page.wait_for_function("document.querySelector('.code .copy').textContent === 'Copied'")
        clipboard = page.evaluate("navigator.clipboard.readText()")
        width = page.evaluate("document.documentElement.scrollWidth")
        browser.close()
    assert got["pwned"] is None and dialogs == [] and got["html"] == 0
    assert "<script>window.__pwned = 1</script>" in got["text"] and 'onerror="window.__pwned = 2"' in got["text"]
    assert got["h2"] == "Plan" and got["strong"] == "Learn the Basics:" and got["em"] == "carefully"
    assert got["ol"] == 2 and got["nested"] == 1
    assert got["th"] == ["tool", "use"] and got["td_code"] == "uv"
    assert got["pre"] == 'print("<b>hi</b>")' and got["copy"] and clipboard == got["pre"]
    assert got["links"] == [["docs", "https://example.org/docs", "noopener noreferrer nofollow"]]  # no javascript:
    assert got["markdown"] == HOSTILE and width <= 390
