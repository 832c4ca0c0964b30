"""The arena's HTTP routes: battles, their turns, votes and the leaderboard.

A battle is a resource the server keeps, so that a vote can only be about answers the
models gave:

- ``POST /v1/arena/battles`` ``{"models"?: [x, y], "reveal"?: false}`` starts one (a random
  pair of served models when ``models`` is absent; random sides either way);
- ``POST /v1/arena/battles/{id}/messages`` ``{"content", "stream"?, "temperature"?, ...}``
  adds a user turn to both conversations and answers it with both models at once. The
  reply is OpenAI's chat completion with two choices, ``index`` 0 for model A and 1 for
  model B, streamed as OpenAI streams ``n=2``;
- ``POST /v1/arena/battles/{id}/vote`` ``{"winner": "model_a" | "model_b" | "tie" |
  "tie (bothbad)"}`` appends the battle as an Arena row and reveals the names;
- ``GET /v1/arena/leaderboard`` ranks the served models (``chattune.serve.leaderboard``).
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import Callable, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from chattune.engine import DEFAULTS, PromptTooLong
from chattune.serve.arena import ArenaError, Battle, Battles, VoteLog
from chattune.serve.leaderboard import leaderboard
from chattune.serve.models import Served
from chattune.serve.protocol import FINISH, ApiError, Reply, engine_request, error_body
from chattune.serve.worker import Busy, Job, Worker


class NewBattle(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] | None = Field(None, min_length=2, max_length=2)
    reveal: bool = False  # show the names from the start (the vote is then not anonymous)


class BattleMessage(BaseModel):
    # forbid: a client sends its turn, never the answers (the server keeps those)
    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stream: bool = False


class Vote(BaseModel):
    model_config = ConfigDict(extra="forbid")

    winner: Literal["model_a", "model_b", "tie", "tie (bothbad)"]


def arena_router(served: Served, worker: Worker, battles: Battles, votes: VoteLog, *, max_tokens: int,
                 authorise: Callable) -> APIRouter:
    """The arena routes, behind the same API key as every other ``/v1`` route."""
    router = APIRouter(dependencies=[Depends(authorise)])
    board: dict = {}  # the last leaderboard, by the number of votes it was fitted on

    def battle(battle_id: str) -> Battle:
        try:
            return battles.get(battle_id)
        except ArenaError as e:
            raise ApiError(e.status, e.message, param="battle_id", code=e.code) from None

    @router.post("/v1/arena/battles")
    def create(body: NewBattle) -> dict:
        try:
            return battles.create(body.models, body.reveal).public()
        except ArenaError as e:
            raise ApiError(e.status, e.message, param="models", code=e.code) from None

    @router.get("/v1/arena/battles/{battle_id}")
    def show(battle_id: str) -> dict:
        return battle(battle_id).public()

    @router.post("/v1/arena/battles/{battle_id}/messages")
    async def message(battle_id: str, body: BattleMessage):
        current = battle(battle_id)
        try:
            current.begin_turn(body.content)
        except ArenaError as e:
            raise ApiError(e.status, e.message, code=e.code) from None
        try:
            jobs = _submit(current, body, served, worker, max_tokens)
        except ApiError:
            current.abort_turn()
            raise
        reply = Reply("arena", prefix="battle")
        events = _turn(jobs, worker, current)
        if body.stream:
            return StreamingResponse(_sse(events, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answers = [None, None]
        async with aclosing(events):
            async for index, kind, value in events:
                if kind == "error":
                    raise ApiError(value[0], value[1], "server_error" if value[0] >= 500 else "invalid_request_error")
                if kind == "done":
                    answers[index] = value
        return reply.whole(*answers)

    @router.post("/v1/arena/battles/{battle_id}/vote")
    async def vote(battle_id: str, body: Vote) -> dict:
        current = battle(battle_id)
        try:
            row = current.close(body.winner)  # on the event loop: no second vote can slip in
        except ArenaError as e:
            raise ApiError(e.status, e.message, param="winner", code=e.code) from None
        try:
            await run_in_threadpool(votes.append, row)
        except OSError as e:
            current.winner = None  # not recorded: the user may vote again
            raise ApiError(500, f"the vote could not be saved ({e.strerror or e})", "server_error") from None
        return {**current.public(), "object": "arena.vote"}

    @router.get("/v1/arena/leaderboard")
    async def standings() -> dict:
        results = list(votes.results)
        if board.get("votes") != len(results):
            board.update(await run_in_threadpool(leaderboard, results, served.names))
        return board

    return router


def _submit(battle: Battle, body: BattleMessage, served: Served, worker: Worker, limit: int) -> list[Job]:
    """Both sides' requests, submitted together or not at all."""
    sampling = DEFAULTS.with_(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    wanted = min(body.max_tokens or limit, limit)
    requests = [engine_request(served, model, conversation, max_new_tokens=wanted, sampling=sampling, stop=[])
                for model, conversation in zip(battle.models, battle.conversations)]
    try:
        for request in requests:
            worker.check(request)
    except PromptTooLong as e:
        raise ApiError(400, str(e), param="content", code="context_length_exceeded") from None
    jobs: list[Job] = []
    try:
        for request in requests:
            jobs.append(worker.submit(request))
    except Busy as e:
        for job in jobs:
            worker.cancel(job)
        raise ApiError(429, f"the server is busy: {e}; retry shortly", "rate_limit_error", code="server_busy",
                       headers={"Retry-After": "1"}) from None
    return jobs


async def _turn(jobs: list[Job], worker: Worker, battle: Battle):
    """``(index, kind, value)`` from both jobs as they come; the turn is kept in the battle
    only when both answers finished, else it is taken back and the other job cancelled."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        while True:
            kind, value = await job.events.get()
            merged.put_nowait((index, kind, value))
            if kind != "text":
                return

    pumps = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    answers: list = [None, None]
    try:
        while None in answers:
            index, kind, value = await merged.get()
            yield index, kind, value
            if kind == "error":
                return
            if kind == "done":
                answers[index] = value
        battle.end_turn((answers[0].text, answers[1].text))
    finally:
        for task in pumps:
            task.cancel()
        for job, answer in zip(jobs, answers):
            if answer is None:
                worker.cancel(job)  # an error on the other side, or the client went away
        battle.abort_turn()  # no-op when the turn ended


async def _sse(events, reply: Reply):
    # aclosing: when the client goes away (starlette closes this generator) the turn is
    # taken back and both jobs cancelled at once, not whenever ``events`` is collected
    async with aclosing(events):
        for index in (0, 1):
            yield reply.chunk({"role": "assistant", "content": ""}, index=index)
        answers = [None, None]
        async for index, kind, value in events:
            if kind == "text":
                yield reply.chunk({"content": value}, index=index)
            elif kind == "done":
                answers[index] = value
                yield reply.chunk({}, FINISH[value.finish_reason], index=index)
            else:  # the status line is already sent: the error is an event, as OpenAI does
                yield f"data: {json.dumps(error_body(*value))}\n\n"
                break
    if None not in answers:
        yield reply.usage_chunk(*answers)
    yield "data: [DONE]\n\n"
