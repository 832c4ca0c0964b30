"""Battles and votes: two served models answer the same user turns, a person votes, and the
vote is appended to a JSONL file as a Chatbot Arena row.

The row is the Arena's own schema (``question_id``, ``model_a``, ``model_b``, ``winner``,
``judge``, ``conversation_a``, ``conversation_b``, ``turn``, ``anony``, ``tstamp``), the
one ``chattune data`` and preference training read, so a votes file trains with
``chattune train --objective dpo --dataset votes.jsonl`` unchanged. The conversations are
the ones the server produced and kept: a vote names a battle and a winner, never text.

Written by hand: no library keeps battles or writes Arena rows. The file is written the
way a log must be: one ``os.write`` of a whole line per vote on an ``O_APPEND`` descriptor,
under a lock, then ``fsync``; a failed write is cut back to where it began, and a half line
found at start-up (another writer that crashed) is ended, so every vote is one line.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
MAX_OPEN = 10_000  # battles kept in memory; the oldest is forgotten first


class ArenaError(Exception):
    """A request the arena refuses: ``status`` 404 (no such battle) or 409 (wrong moment)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(eq=False)
class Battle:
    """Two models, their conversations (the same user turns), and the vote once given."""

    id: str
    models: tuple[str, str]  # (model_a, model_b): the sides as voted on
    anony: bool  # names hidden until the vote, as in the Arena's anonymous battles
    conversations: tuple[list[dict], list[dict]] = field(default_factory=lambda: ([], []))
    answering: bool = False
    winner: str | None = None

    @property
    def turn(self) -> int:
        return sum(m["role"] == "user" for m in self.conversations[0])

    def public(self) -> dict:
        """What a client may see: the names only when not anonymous or after the vote."""
        shown = not self.anony or self.winner is not None
        return {"id": self.id, "object": "arena.battle", "turn": self.turn, "winner": self.winner,
                "model_a": self.models[0] if shown else None, "model_b": self.models[1] if shown else None}

    def begin_turn(self, text: str) -> None:
        self._open("send a message")
        for conversation in self.conversations:
            conversation.append({"role": "user", "content": text})
        self.answering = True

    def end_turn(self, answers: tuple[str, str]) -> None:
        for conversation, answer in zip(self.conversations, answers):
            conversation.append({"role": "assistant", "content": answer})
        self.answering = False

    def abort_turn(self) -> None:
        """The turn did not finish on both sides (a client gone, an error): forget it, so
        both conversations keep the same, answered user turns."""
        if self.answering:
            for conversation in self.conversations:
                conversation.pop()
            self.answering = False

    def close(self, winner: str) -> dict:
        """Record ``winner`` and return the battle as an Arena row."""
        self._open("vote")
        if self.turn == 0:
            raise ArenaError(409, f"battle {self.id} has no answers to vote on yet", "battle_empty")
        self.winner = winner
        return {"question_id": self.id, "model_a": self.models[0], "model_b": self.models[1], "winner": winner,
                "judge": "chattune serve", "conversation_a": self.conversations[0],
                "conversation_b": self.conversations[1], "turn": self.turn, "anony": self.anony,
                "tstamp": round(time.time(), 3)}

    def _open(self, action: str) -> None:
        if self.winner is not None:
            raise ArenaError(409, f"battle {self.id} is already voted on; start a new battle to {action}",
                             "battle_voted")
        if self.answering:
            raise ArenaError(409, f"battle {self.id} is still answering; wait for both answers to {action}",
                             "battle_answering")


class Battles:
    """The open battles of one server, in memory (a restart forgets unvoted battles)."""

    def __init__(self, names: list[str], rng: random.Random | None = None, max_open: int = MAX_OPEN):
        self.names, self.rng, self.max_open = list(names), rng or random.Random(), max_open
        self.open: OrderedDict[str, Battle] = OrderedDict()

    def create(self, models: list[str] | None = None, reveal: bool = False) -> Battle:
        """A battle between ``models`` (two served names) or a random pair; random sides either way."""
        if models is None:
            pair = self.rng.sample(self.names, 2)
        else:
            unknown = [m for m in models if m not in self.names]
            if unknown:
                raise ArenaError(404, f"model '{unknown[0]}' is not served here; models: {', '.join(self.names)}",
                                 "model_not_found")
            if len(models) != 2 or models[0] == models[1]:
                raise ArenaError(400, "a battle needs two different models", "invalid_models")
            pair = self.rng.sample(models, 2)
        battle = Battle(f"battle-{uuid.uuid4().hex}", (pair[0], pair[1]), anony=not reveal)
        self.open[battle.id] = battle
        while len(self.open) > self.max_open:
            self.open.popitem(last=False)
        return battle

    def get(self, battle_id: str) -> Battle:
        if battle_id not in self.open:
            raise ArenaError(404, f"no battle '{battle_id}' (unknown, or forgotten by a restart)", "battle_not_found")
        return self.open[battle_id]


class VoteLog:
    """The votes file: existing votes read at start-up, each new one appended durably.

    Args:
        path: the JSONL file (created with its folder); ``None`` keeps votes in memory only.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.lock = threading.Lock()
        self.results: list[tuple[str, str, str]] = []  # (model_a, model_b, winner) of every vote, for the leaderboard
        self.fd: int | None = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            self.results = _results(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if _ends_mid_line(path):
            self._write(b"\n")

    def append(self, row: dict) -> None:
        """Append ``row`` as one line and fsync it before returning (blocking: call off the event loop)."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            if self.fd is not None:
                self._write(line)
            self.results.append((row["model_a"], row["model_b"], row["winner"]))

    def _write(self, data: bytes) -> None:
        start = os.fstat(self.fd).st_size
        try:
            view = memoryview(data)
            while view:  # one write() in practice; a short write (disk nearly full) continues
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError:
            os.ftruncate(self.fd, start)  # no half line left behind by a failed write
            raise

    def close(self) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


def _results(path: Path) -> list[tuple[str, str, str]]:
    """The votes already in ``path``; lines that are not votes are skipped (``chattune data`` counts them)."""
    out = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("winner") in WINNERS and all(
                    isinstance(row.get(k), str) for k in ("model_a", "model_b")):
                out.append((row["model_a"], row["model_b"], row["winner"]))
    return out


def _ends_mid_line(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"
