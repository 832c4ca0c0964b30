"""Load test of ``chattune serve`` on SmolLM2-135M: bounded bursts of streaming requests.

Starts the server (a subprocess, loopback only) on a run of the built-in SmolLM2-135M,
then for 1, 8, 32 and 64 concurrent clients sends a fixed number of streaming chat
requests (each client sends its share one after another) and stops. Per level it reports
aggregate completion tokens/s, p50/p95 time to first token, p50/p95 total latency and
failures (a non-200 answer, a broken stream, or a stream without ``data: [DONE]``).
Finally the server gets SIGTERM and must exit 0.

With ``--workload battle`` each request is an arena battle instead: start a battle of the
run against ``base``, stream both answers (two streams in one response), vote; a failure
is also a battle that does not end with both answers finished and the vote recorded.
Tokens are both answers' together. The votes go to a temporary file.

    .venv/bin/python benchmarks/serve_load.py                 # the README table
    .venv/bin/python benchmarks/serve_load.py --quick         # a short check that it works
    .venv/bin/python benchmarks/serve_load.py --run runs/demo # serve an existing run
    .venv/bin/python benchmarks/serve_load.py --quick --workload battle

The last line is one JSON object: ``failures``, ``tokens_per_s`` per concurrency,
``speedup_32_vs_1`` and the per-level details.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "chattune" / "resources" / "sample_arena.jsonl"


def prompts(n: int) -> list[str]:
    """First user turns of the built-in arena sample (short ones: this measures decoding)."""
    out = []
    for line in SAMPLE.read_text().splitlines():
        turns = json.loads(line).get("conversation_a") or []
        if turns and turns[0]["role"] == "user" and 10 < len(turns[0]["content"]) < 300:
            out.append(turns[0]["content"])
    return [out[i % len(out)] for i in range(n)]


def train_run(out: Path) -> Path:
    """A one-step LoRA run on SmolLM2-135M: the served speed does not depend on training."""
    cmd = [sys.executable, "-m", "chattune.cli", "train", "--model", "smollm2-135m", "--max-steps", "1",
           "--batch-size", "2", "--max-length", "256", "--set", "train.max_eval_samples=4", "--output-dir", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def start_server(run: Path, max_batch: int, max_tokens: int, votes: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "chattune.cli", "serve", f"bench={run}", "--port", "0", "--max-batch",
           str(max_batch), "--max-queue", "512", "--max-tokens", str(max_tokens), "--votes", str(votes)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(600)
    if not box or not box[0].startswith("chattune serve: "):
        proc.kill()
        raise SystemExit(f"the server did not start (first line {box[:1]!r})")
    return proc, box[0].split()[2].rstrip("/")


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, seed: int,
                      battle: bool = False) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "seed": seed}
    route = "/v1/chat/completions"
    start = time.perf_counter()
    first = None
    tokens = 0
    done = False
    finished = set()  # the choices (one, or a battle's two) that ended with a finish_reason
    try:
        if battle:
            created = await http.post(f"{url}/v1/arena/battles", json={"models": ["bench", "base"]})
            if created.status_code != 200:
                return {"ok": False, "why": f"battle HTTP {created.status_code}"}
            route = f"/v1/arena/battles/{created.json()['id']}/messages"
            body = {"content": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True}
        async with http.stream("POST", f"{url}{route}", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "why": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if first is None and choice["delta"].get("content"):
                        first = time.perf_counter() - start
                    if choice["finish_reason"]:
                        finished.add(choice["index"])
        if battle and done:
            voted = await http.post(f"{url}{route.rsplit('/', 1)[0]}/vote", json={"winner": "tie"})
            if voted.status_code != 200:
                return {"ok": False, "why": f"vote HTTP {voted.status_code}"}
    except httpx.HTTPError as e:
        return {"ok": False, "why": type(e).__name__}
    total = time.perf_counter() - start
    done = done and len(finished) == (2 if battle else 1)
    return {"ok": done, "why": None if done else "no [DONE] or an unfinished answer",
            "ttft": first if first is not None else total, "latency": total, "tokens": tokens}


async def burst(url: str, clients: int, requests: int, max_tokens: int, texts: list[str],
                battle: bool = False) -> dict:
    """``requests`` requests from ``clients`` concurrent clients; each client sends its share in turn."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        share = [list(range(c, requests, clients)) for c in range(clients)]

        async def client(ids: list[int]) -> list[dict]:
            return [await one_request(http, url, texts[i], max_tokens, seed=i, battle=battle) for i in ids]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(ids) for ids in share)) for r in rs]
        wall = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in good)
    return {"clients": clients, "requests": requests, "failures": len(results) - len(good),
            "failure_reasons": sorted({r["why"] for r in results if not r["ok"]}),
            "wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            **_quantiles("ttft", [r["ttft"] for r in good]), **_quantiles("latency", [r["latency"] for r in good])}


def _quantiles(name: str, xs: list[float]) -> dict:
    if not xs:
        return {f"{name}_p50_s": None, f"{name}_p95_s": None}
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return {f"{name}_p50_s": round(statistics.median(xs), 3), f"{name}_p95_s": round(p95, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run to serve (default: a one-step LoRA run on smollm2-135m)")
    parser.add_argument("--levels", default="1,8,32,64", help="concurrent clients per burst")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in each burst (default 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    parser.add_argument("--quick", action="store_true", help="levels 1,8,32, one request per client, 16 tokens")
    parser.add_argument("--workload", choices=["chat", "battle"], default="chat",
                        help="chat: one stream per request; battle: an arena battle (two streams) and its vote")
    args = parser.parse_args()
    if args.quick:
        args.levels, args.requests, args.max_tokens = "1,8,32", 1, 16
    levels = [int(x) for x in args.levels.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still stop the server (finally below)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_run(Path(tmp) / "run")
        battle = args.workload == "battle"
        # a battle is two rows of the batch
        proc, url = start_server(run, max_batch=max(levels) * (2 if battle else 1), max_tokens=args.max_tokens,
                                 votes=Path(tmp) / "votes.jsonl")
        try:
            texts = prompts(max(levels) * args.requests)
            asyncio.run(burst(url, 1, 1, 4, texts))  # warm-up: first-call costs are not throughput
            rows = []
            for clients in levels:
                rows.append(asyncio.run(burst(url, clients, clients * args.requests, args.max_tokens, texts, battle)))
                r = rows[-1]
                print(f"{clients:>3} clients: {r['requests']} requests, {r['tokens_per_s']:.1f} tokens/s, TTFT p50 "
                      f"{r['ttft_p50_s']} s p95 {r['ttft_p95_s']} s, latency p50 {r['latency_p50_s']} s p95 "
                      f"{r['latency_p95_s']} s, {r['failures']} failures", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        model = yaml.safe_load((run / "config.yaml").read_text())["model"]["name"]
    speed = {str(r["clients"]): r["tokens_per_s"] for r in rows}
    ratio = round(speed["32"] / speed["1"], 2) if "32" in speed and "1" in speed and speed["1"] else None
    print(json.dumps({"model": model, "run": str(args.run or "one-step LoRA"), "quick": args.quick,
                      "workload": args.workload,
                      "max_tokens": args.max_tokens, "failures": sum(r["failures"] for r in rows), "tokens_per_s": speed,
                      "speedup_32_vs_1": ratio, "server_exit_code": code, "levels": rows}))


if __name__ == "__main__":
    main()
