"""The engine thread: requests from every HTTP client decode in one continuous batch.

``Engine`` is synchronous and not thread-safe, so exactly one thread touches it. HTTP
handlers run on the asyncio loop and talk to that thread through a queue (submit,
cancel); the thread hands text deltas and finished answers back with
``loop.call_soon_threadsafe`` onto one ``asyncio.Queue`` per request. This glue is the
only part of the server written by hand: uvicorn, FastAPI and the engine do the rest.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

from chattune.engine import Answer, Engine, Request
from chattune.errors import UserError

log = logging.getLogger(__name__)


class Busy(Exception):
    """Every slot and every queue place is taken."""


@dataclass(eq=False)
class Job:
    """One request on its way through the engine, seen from the asyncio side."""

    request: Request
    loop: asyncio.AbstractEventLoop
    # ("text", str) | ("done", Answer) | ("error", (HTTP status, message))
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def push(self, kind: str, value) -> None:
        """Called on the engine thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker:
    """Owns the engine on one background thread.

    Args:
        make_engine: builds the engine (again after an internal error, so one bug does
            not leave a half-updated batch behind).
        max_queue: requests that may wait for a slot; beyond ``max_batch + max_queue``
            requests in flight ``submit`` raises ``Busy`` (HTTP 429).
    """

    def __init__(self, make_engine: Callable[[], Engine], max_queue: int):
        self.make_engine = make_engine
        self.engine = make_engine()
        self.capacity = self.engine.max_batch + max_queue
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.jobs: set[Job] = set()  # submitted and not yet answered; guarded by ``lock``
        self.thread = threading.Thread(target=self._loop, name="chattune-engine", daemon=True)

    # -- any thread ------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self.inbox.put(("stop", None))
        self.thread.join(timeout)

    @property
    def in_flight(self) -> int:
        with self.lock:
            return len(self.jobs)

    def check(self, request: Request) -> None:
        """Raise the engine's ``UserError`` for a request it would refuse (e.g. a prompt
        longer than the context); reads only the engine's fixed settings."""
        self.engine.check_length(request)

    def submit(self, request: Request) -> Job:
        """Queue ``request``; its text deltas and answer arrive on the returned job's events."""
        job = Job(request, asyncio.get_running_loop())
        with self.lock:
            if len(self.jobs) >= self.capacity:
                raise Busy(f"{len(self.jobs)} requests in flight (max batch {self.engine.max_batch} + queue "
                           f"{self.capacity - self.engine.max_batch})")
            self.jobs.add(job)
        request.tag = job
        request.on_text = lambda text: job.push("text", text)
        self.inbox.put(("add", job))
        return job

    def cancel(self, job: Job) -> None:
        """Drop ``job`` (its client went away): it leaves the batch at the next step."""
        self.inbox.put(("cancel", job))

    # -- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                # idle: sleep until a message; busy: take what arrived and decode on
                kind, job = self.inbox.get_nowait() if self.engine.has_work() else self.inbox.get()
            except queue.Empty:
                kind = None
            while kind is not None:
                if kind == "stop":
                    self._fail_all(503, "the server is shutting down")
                    return
                self._handle(kind, job)
                try:
                    kind, job = self.inbox.get_nowait()
                except queue.Empty:
                    kind = None
            try:
                # step() also hands out answers cancelled while still waiting for a slot
                answers = self.engine.step()
            except Exception:  # a bug: keep serving the next requests on a fresh engine
                log.exception("chattune serve: decoding failed")
                self._fail_all(500, "internal error while decoding")
                self.engine = self.make_engine()
                continue
            for answer in answers:
                self._finish(answer.tag, "done", answer)

    def _handle(self, kind: str, job: Job) -> None:
        if kind == "cancel":
            self.engine.cancel(job.request)
            return
        try:
            self.engine.add(job.request)
        except UserError as e:
            self._finish(job, "error", (400, str(e)))

    def _finish(self, job: Job, kind: str, value: Answer | tuple[int, str]) -> None:
        with self.lock:
            self.jobs.discard(job)
        job.push(kind, value)

    def _fail_all(self, status: int, message: str) -> None:
        with self.lock:
            jobs, self.jobs = list(self.jobs), set()
        for job in jobs:
            job.push("error", (status, message))
