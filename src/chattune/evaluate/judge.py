"""An optional LLM judge: tuned vs base, pairwise, against any OpenAI-compatible
``/v1/chat/completions`` endpoint.

As in Arena-Hard, each pair is judged in both orders (the judge's position bias cancels)
and the verdict is one of ``[[A>>B]] [[A>B]] [[A=B]] [[B>A]] [[B>>A]]``; a reply with no
verdict, or with two different ones, is counted as unparseable. The win rate comes with a
bootstrap interval over prompts, and a length-controlled win rate as in AlpacaEval 2 (Dubois
et al. 2024): a logistic regression of the verdict on the length difference, read at a
difference of zero. Verdicts are cached on disk, keyed by the exact request, so a rerun
with the same answers costs nothing.

The request is one JSON POST: written with urllib rather than adding the ``openai``
client and its eight dependencies for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from chattune.errors import UserError
from chattune.evaluate.metrics import Bootstrap

SYSTEM = (
    "You are an impartial judge. Compare the answers of two AI assistants, A and B, to the user prompt below "
    "and decide which is better. First write your own answer to the prompt. Then check both answers against "
    "yours: point out mistakes and inaccurate information, and judge whether each answer is helpful (it does "
    "what the prompt asks; where the prompt is ambiguous, asking for clarification is better than assuming), "
    "relevant and concise. Note any important information an answer leaves out. Do not let the order of the "
    "answers, their length or the assistants' names influence you. End with exactly one verdict label:\n"
    "1. Assistant A is significantly better: [[A>>B]]\n2. Assistant A is slightly better: [[A>B]]\n"
    "3. Tie, relatively the same: [[A=B]]\n4. Assistant B is slightly better: [[B>A]]\n"
    "5. Assistant B is significantly better: [[B>>A]]\n"
    'Example output: "My final verdict is tie: [[A=B]]".')
TEMPLATE = ("<|User Prompt|>\n{prompt}\n\n<|The Start of Assistant A's Answer|>\n{a}\n<|The End of Assistant A's "
            "Answer|>\n\n<|The Start of Assistant B's Answer|>\n{b}\n<|The End of Assistant B's Answer|>")
VERDICT = re.compile(r"\[\[([AB<>=]+)\]\]")
# The first answer's score for each label; the pair's other order reads it mirrored.
SCORES = {"A>>B": 1.0, "A>B": 1.0, "A=B": 0.5, "B>A": 0.0, "B>>A": 0.0}
MIRROR = {"A>>B": "B>>A", "A>B": "B>A", "A=B": "A=B", "B>A": "A>B", "B>>A": "A>>B"}


def parse_verdict(text: str) -> str | None:
    """The reply's verdict label, or None when it has none or several different ones."""
    found = set(VERDICT.findall(text or ""))
    if len(found) != 1:
        return None
    label = found.pop()
    return label if label in SCORES else None


def chat_url(url: str) -> str:
    """Accept a server root, a ``/v1`` base URL (as OpenAI clients take) or the full path."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class Judge:
    def __init__(self, url: str, model: str, key_env: str | None, cache_path: Path, workers: int = 8,
                 timeout: float = 300.0, max_tokens: int = 2048):
        if urlparse(url).scheme not in ("http", "https") or not urlparse(url).hostname:
            raise UserError(f"--judge-url {url}: give an http(s) URL such as http://127.0.0.1:8000/v1")
        self.url, self.model, self.key_env = chat_url(url), model, key_env
        self.cache_path, self.workers, self.timeout, self.max_tokens = cache_path, workers, timeout, max_tokens
        self.cache = _read_cache(cache_path)
        self.lock = threading.Lock()
        self.calls = 0

    def check(self) -> None:
        """Fail fast: a missing key or an endpoint nobody listens on, before any decoding."""
        if self.key_env and not os.environ.get(self.key_env):
            raise UserError(f"--judge-key-env {self.key_env}: that environment variable is not set")
        parts = urlparse(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=10).close()
        except OSError as e:
            raise UserError(f"judge endpoint {self.url} is unreachable ({e.strerror or type(e).__name__})") from None

    # -- requests ---------------------------------------------------------------------
    def ask(self, user: str) -> str:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if key in self.cache:
            return self.cache[key]
        text = self._post(body)
        with self.lock:
            self.cache[key] = text
            self.calls += 1
            with self.cache_path.open("a", encoding="utf-8") as f:  # one line per verdict: an interrupted run keeps them
                f.write(json.dumps({"key": key, "reply": text}, ensure_ascii=False) + "\n")
        return text

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.key_env:
            headers["Authorization"] = f"Bearer {os.environ[self.key_env]}"
        data = json.dumps(body).encode()
        for attempt in range(4):
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode())
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                if e.code in (429, 500, 502, 503, 504) and attempt < 3:
                    time.sleep(2 ** attempt)  # rate limits and overloads pass
                    continue
                raise UserError(f"judge endpoint {self.url} answered HTTP {e.code} ({e.reason})") from None
            except urllib.error.URLError as e:
                raise UserError(f"judge endpoint {self.url} is unreachable ({e.reason})") from None
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                raise UserError(f"judge endpoint {self.url} did not answer like /v1/chat/completions") from None
        raise AssertionError("unreachable")

    # -- the comparison -----------------------------------------------------------------
    def compare(self, qs, answers: list[dict], decoding: str) -> dict:
        """Tuned vs base on each prompt's first turn, under ``decoding``, judged in both orders."""
        first = {(r["prompt_index"], r["model"]): r for r in answers if r["decoding"] == decoding and r["turn"] == 0}
        pairs = [(qi, first[(qi, "tuned")], first[(qi, "base")]) for qi in sorted({k[0] for k in first})
                 if (qi, "tuned") in first and (qi, "base") in first]
        jobs = []
        for qi, t, b in pairs:
            prompt = qs.questions[qi].turns[0]
            jobs.append((qi, t, b, "tuned_first", TEMPLATE.format(prompt=prompt, a=t["text"], b=b["text"])))
            jobs.append((qi, t, b, "base_first", TEMPLATE.format(prompt=prompt, a=b["text"], b=t["text"])))
        unique = list(dict.fromkeys(job[4] for job in jobs))  # equal answers make both orders one request
        with ThreadPoolExecutor(self.workers) as pool:
            replies = dict(zip(unique, pool.map(self.ask, unique)))
        judgements = []
        for qi, t, b, order, text in jobs:
            label = parse_verdict(replies[text])
            if label is not None and order == "base_first":
                label = MIRROR[label]  # from the tuned answer's side: A is always tuned below
            judgements.append({"prompt": qi, "order": order, "label": label, "length_diff": t["tokens"] - b["tokens"]})
        return summarise(judgements, len(qs.questions), self.model, decoding, self.calls)


def summarise(judgements: list[dict], n_prompts: int, model: str, decoding: str, calls: int) -> dict:
    """Win rate of tuned over base (win 1, tie 0.5), its interval, and the length-controlled rate."""
    ok = [j for j in judgements if j["label"] is not None]
    labels = Counter(j["label"].replace("A", "tuned").replace("B", "base") for j in ok)
    out = {"judge_model": model, "decoding": decoding, "judgements": len(judgements), "unparseable":
           len(judgements) - len(ok), "verdicts": dict(labels), "new_requests": calls}
    if not ok:
        return out
    y = np.array([SCORES[j["label"]] for j in ok])
    boot = Bootstrap([j["prompt"] for j in ok], n_prompts)
    out["win_rate"] = float(y.mean())
    out["win_rate_ci"] = boot.mean(y)
    diff = np.array([j["length_diff"] for j in ok], dtype=float)
    out["lc_win_rate"] = lc_win_rate(y, diff)
    lc = [lc_win_rate(y, diff, w) for w in boot.weights[:200]]
    lo, hi = np.percentile(lc, [2.5, 97.5])
    out["lc_win_rate_ci"] = [float(lo), float(hi)]
    return out


def lc_win_rate(y: np.ndarray, length_diff: np.ndarray, weights: np.ndarray | None = None) -> float:
    """P(tuned wins) at equal lengths: logistic regression ``y ~ b0 + b1 tanh(diff / sd)``,
    fitted by Newton's method on the (fractional) verdicts, read at ``diff = 0``: sigmoid(b0)."""
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    sd = float(length_diff.std()) or 1.0
    x = np.stack([np.ones_like(y), np.tanh(length_diff / sd)], 1)  # (N, 2)
    beta = np.zeros(2)
    ridge = 1e-3 * np.eye(2)  # keeps the fit finite when every verdict agrees
    for _ in range(30):
        p = 1 / (1 + np.exp(-x @ beta))
        grad = x.T @ (w * (y - p)) - ridge @ beta
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + ridge
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-8:
            break
    return float(1 / (1 + np.exp(-beta[0])))


def _read_cache(path: Path) -> dict:
    cache = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                cache[rec["key"]] = rec["reply"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by an interrupted run
    return cache
