"""The ``chattune serve`` command line: load the runs, bind, print the URL, serve until SIGTERM."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path

from chattune.errors import UserError


def add_parser(sub) -> None:
    from chattune.engine.lean import WEIGHTS

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server and web chat page for trained runs",
                       description="Serve runs that share one base model. Each run is a model named by its "
                                   "directory (or NAME=RUN_DIR); 'base' is the base model without any method.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory, or NAME=RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key-env", metavar="VAR", help="require 'Authorization: Bearer $VAR' on /v1/*")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--decode-weights", choices=list(WEIGHTS), default="float32",
                   help="precision of the decode step's weights on a CPU (Llama-family models): float16 reads half "
                        "the bytes a token, answers may differ from float32's (docs/chat-and-export.md; default float32)")
    p.add_argument("--max-queue", type=int, default=128,
                   help="requests waiting for a slot before new ones get 429 (default 128)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="cap on a request's max_tokens, and its default (default 512)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from this origin (repeatable; default: none)")
    p.add_argument("--votes", metavar="FILE",
                   help="arena votes are appended to this JSONL file as Arena rows (default: votes.jsonl in the "
                        "first run's directory)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from chattune.serve.app import build_app
    except ImportError as e:
        raise UserError(f"chattune serve needs the serve extra ({e.name} is missing): "
                        f"pip install 'chattune[serve]'") from None
    from chattune.engine import Engine
    from chattune.serve.arena import VoteLog
    from chattune.serve.models import load_served
    from chattune.serve.worker import Worker

    for flag in ("max_batch", "max_tokens"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        raise UserError("--max-queue must be >= 0")
    api_key = _api_key(args.api_key_env)
    sock = _bind(args.host, args.port)
    served = load_served(args.runs)

    def make_engine() -> Engine:
        return Engine(served.variants, served.tokenizer, served.tokenizer.eos_token_id, max_batch=args.max_batch,
                      weights=args.decode_weights)

    votes_path = Path(args.votes) if args.votes else next(iter(served.runs.values())).run_dir / "votes.jsonl"
    try:
        votes = VoteLog(votes_path)
    except OSError as e:
        raise UserError(f"--votes {votes_path}: cannot open for appending ({e.strerror or e})") from None
    worker = Worker(make_engine, args.max_queue)
    app = build_app(served, worker, max_tokens=args.max_tokens, api_key=api_key, cors_origins=args.cors_origin,
                    votes=votes)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=args.grace)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"chattune serve: http://{shown}:{port}/  models: {', '.join(served.names)}", flush=True)
    print(f"chattune serve: arena votes go to {votes_path} ({len(votes.results)} already there)", flush=True)
    if not api_key and not ipaddress.ip_address(host).is_loopback:
        print(f"chattune serve: warning: listening on {host} without --api-key-env; anyone who can reach "
              f"this port can use the models", file=sys.stderr, flush=True)
    worker.start()
    # uvicorn turns SIGTERM/SIGINT into a graceful shutdown, then re-raises the signal to the
    # handler installed before it; an ignoring handler makes that a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop(timeout=10)
        votes.close()
        sock.close()
    return 0


def _api_key(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var, "")
    if not key:
        raise UserError(f"--api-key-env {var}: the environment variable {var} is not set or empty")
    return key


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the models, so a taken port fails at once (and port 0 is known)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        raise UserError(f"--host {host}: give an IP address (e.g. 127.0.0.1 or 0.0.0.0)") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)  # connections made while the models load wait in the backlog
    return sock
