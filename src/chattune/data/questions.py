"""Evaluation prompts: benchmark question files and every row format ``chattune data`` reads.

Two question shapes beyond the training formats:
- MT-Bench (FastChat ``question.jsonl``): ``{"question_id", "category", "turns": [str, ...]}``,
  optional ``"reference": [str, ...]``; Arena-Hard v0.1's official file has the same shape
  with ``"turns": [{"content": str}]``.
- Arena-Hard style: ``{"uid" or "id", "prompt", optional "answers": {model: text}}``;
  chattune's ``prompt-answers`` rows are the same shape and are read here too.

Any other file goes through ``load_conversations`` (arena, messages, sharegpt, alpaca): the
first user turn is the prompt, its answer the reference. As in the data pipeline, every
row not used is counted under its reason.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from chattune.data.config import DataConfig
from chattune.data.select import load_conversations
from chattune.data.sources import BadRow, _peek, read_records
from chattune.errors import UserError

QUESTION_FORMATS = ["auto", "mtbench", "arena-hard", "arena", "messages", "sharegpt", "alpaca", "prompt-answers"]
ARENA_HARD_BASELINE = "gpt-4-0314"  # Arena-Hard v0.1's baseline: the default reference when a row has it


@dataclass
class Question:
    id: str
    turns: list[str]  # user turns; the second is asked after the model's own first answer
    reference: str | None = None  # a reference answer to the first turn
    category: str | None = None
    raw_id: object = None  # the id as the file wrote it (MT-Bench ids are integers), for exports


@dataclass
class QuestionSet:
    source: str
    format: str
    questions: list[Question] = field(default_factory=list)
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    without_reference: int = 0  # kept, but the chosen reference model has no answer to it
    reference_model: str | None = None
    id_key: str = "id"  # the file's id field, written back by the exports

    def select(self, n: int | None) -> "QuestionSet":
        """``n`` questions picked by a stable hash of their id (a file sorted by topic still
        gives a spread of topics), kept in file order; all of them when fewer."""
        if n is None or n >= len(self.questions):
            return self
        keep = set(sorted(range(len(self.questions)), key=lambda i: _hash(self.questions[i].id))[:n])
        self.questions = [q for i, q in enumerate(self.questions) if i in keep]
        return self


def _hash(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def read_questions(path: str, fmt: str = "auto", turns: str = "first", reference_model: str | None = None,
                   data_cfg: DataConfig | None = None) -> QuestionSet:
    """Questions from ``path``; ``turns='all'`` keeps a second user turn where there is one."""
    if fmt not in QUESTION_FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(QUESTION_FORMATS)}")
    name, records = read_records(path)
    first, records = _peek(records)
    if fmt == "auto":
        fmt = _detect(first)
    if fmt == "prompt-answers":
        fmt = "arena-hard"
    if fmt == "mtbench":
        out = QuestionSet(name, fmt, id_key="question_id")
        _read_rows(out, records, lambda rec: _mtbench(rec, turns))
    elif fmt == "arena-hard":
        model = reference_model or _default_reference(first)
        out = QuestionSet(name, fmt, reference_model=model, id_key="uid" if first and "uid" in first else "id")
        _read_rows(out, records, lambda rec: _arena_hard(rec, model))
    else:
        return _from_conversations(path, fmt, turns, reference_model, data_cfg)
    return _dedup(out)


def _detect(first: dict | None) -> str:
    if first is None:
        raise UserError("the prompt file has no readable rows")
    if "turns" in first:
        return "mtbench"
    if "prompt" in first:
        return "arena-hard"
    return "auto"  # a training format: load_conversations tells which


def _read_rows(out: QuestionSet, records, parse) -> None:
    for where, rec in records:
        out.rows_read += 1
        try:
            if isinstance(rec, BadRow):
                raise rec
            out.questions.append(parse(rec))
        except BadRow as bad:
            out.dropped[bad.reason] += 1


def _row_id(rec: dict, *keys: str) -> tuple[str, object]:
    for key in keys:
        if isinstance(rec.get(key), (str, int)) and not isinstance(rec.get(key), bool):
            return str(rec[key]), rec[key]
    raise BadRow("missing_field", f"no id ({' or '.join(keys)})")


def _text(value, what: str) -> str:
    if isinstance(value, dict):  # Arena-Hard v0.1's {"content": text}
        value = value.get("content")
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{what} is not a string")
    if not value.strip():
        raise BadRow("empty_turn", what)
    return value.strip()


def _mtbench(rec: dict, turns: str) -> Question:
    qid, raw = _row_id(rec, "question_id", "uid", "id")
    raw_turns = rec.get("turns")
    if not isinstance(raw_turns, list) or not raw_turns:
        raise BadRow("missing_field", "no 'turns' list")
    texts = [_text(t, f"turn {i}") for i, t in enumerate(raw_turns[: 2 if turns == "all" else 1])]
    refs = rec.get("reference")
    reference = _text(refs[0], "reference") if isinstance(refs, list) and refs else None
    category = rec.get("category") if isinstance(rec.get("category"), str) else None
    return Question(qid, texts, reference, category, raw)


def _default_reference(first: dict | None) -> str | None:
    answers = first.get("answers") if first else None
    if not isinstance(answers, dict) or not answers:
        return None  # prompts only: no reference metrics
    if ARENA_HARD_BASELINE in answers:
        return ARENA_HARD_BASELINE
    if len(answers) == 1:
        return next(iter(answers))
    raise UserError(f"the prompt file has answers from several models: choose the reference with "
                    f"--reference-model ({', '.join(sorted(answers))})")


def _arena_hard(rec: dict, model: str | None) -> Question:
    qid, raw = _row_id(rec, "uid", "id", "question_id")
    prompt = _text(rec.get("prompt"), "prompt")
    reference = None
    if model is not None:
        answers = rec.get("answers")
        if isinstance(answers, dict) and isinstance(answers.get(model), str) and answers[model].strip():
            reference = answers[model].strip()
    category = rec.get("category") if isinstance(rec.get("category"), str) else None
    return Question(qid, [prompt], reference, category, raw)


def _from_conversations(path: str, fmt: str, turns: str, reference_model: str | None,
                        data_cfg: DataConfig | None) -> QuestionSet:
    # The data pipeline's own selection (flags, alternation, empty turns), without a split.
    base = data_cfg.__dict__ if data_cfg is not None else {}
    keep = {k: base[k] for k in ("side", "keep_flagged", "language") if k in base}
    # max_answer_repetition=0: a looping reference answer is still a prompt worth asking
    cfg = DataConfig(dataset=path, format=fmt, answer_model=reference_model, val_ratio=0.0, test_ratio=0.0,
                     max_answer_repetition=0, **keep)
    convs = load_conversations(cfg)
    out = QuestionSet(convs.source, convs.format, rows_read=convs.rows_read, dropped=Counter(convs.dropped))
    for sample in convs.samples:
        out.questions.append(question_of(sample, turns))
    return _dedup(out)


def question_of(sample: dict, turns: str) -> Question:
    """A selected conversation as a question: its first user turn (and the second with
    ``turns='all'``), the first answer as the reference."""
    msgs = sample["messages"]
    users = [m["content"] for m in msgs if m["role"] == "user"][: 2 if turns == "all" else 1]
    return Question(str(sample["id"]), users, msgs[1]["content"] if len(msgs) > 1 else None, raw_id=sample["id"])


def _dedup(out: QuestionSet) -> QuestionSet:
    """One question per first prompt (an arena tie gives both sides of one prompt)."""
    seen, kept = set(), []
    for q in out.questions:
        key = _hash(q.turns[0])
        if key in seen:
            out.dropped["duplicate_prompt"] += 1
            continue
        seen.add(key)
        kept.append(q)
    out.questions = kept
    out.without_reference = sum(q.reference is None for q in kept)
    if not kept:
        raise UserError(f"{out.source}: no usable prompts ({dict(out.dropped) or 'the file is empty'})")
    return out
