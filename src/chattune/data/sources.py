"""Read rows from the built-in sample, the hub or a local file, and parse them into ``Row``s.

Seven row formats share one shape after parsing: a ``Row`` holding one conversation per
side (arena rows have sides "a" and "b", every other format one side, ``None``). Pair
rows ({prompt, chosen, rejected}, or prompt-answers with --chosen-model/--rejected-model)
parse as arena rows whose vote went to side "a", so preference pairs and SFT's
``--side winner`` read them with the arena's own rules. A row
that cannot be read becomes a ``BadRow`` carrying its reason, so the caller can count it
(or stop on it with --strict) instead of crashing: counters are the contract.

Hostile files are part of that contract: a byte-order mark, CRLF endings, invalid UTF-8
(replaced), unicode line separators inside strings (only ``\n`` ends a JSONL row), values
nested past the parser's limit, lone surrogates and huge numbers each cost one counted row,
never a traceback; a file that cannot be opened at all (a directory, a symlink loop, no
permission) ends in one line.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from chattune.data.config import DataConfig
from chattune.errors import UserError

SAMPLE = "sample"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class BadRow(Exception):
    """A row that cannot be used as input; ``reason`` is its counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Row:
    """One parsed row. ``sides`` maps "a"/"b" (arena) or None to its messages, or to the
    ``BadRow`` explaining why that side is unusable (only fatal if the side is used)."""

    where: str
    id: str
    sides: dict[str | None, list[dict] | BadRow]
    winner: Any = None
    language: str | None = None
    flagged: bool = False
    label: bool | None = None  # unpaired rows: thumbs up (True) or down (False)


@dataclass
class Source:
    name: str
    format: str
    rows: Iterator[tuple[str, Row | BadRow]] = field(repr=False)


def open_source(cfg: DataConfig) -> Source:
    """Resolve ``cfg.dataset`` and ``cfg.format``; rows are read lazily from ``.rows``."""
    name, records = _records(cfg.dataset)
    if cfg.max_rows is not None:
        records = itertools.islice(records, cfg.max_rows)
    first, records = _peek(records)
    fmt = cfg.format if cfg.format != "auto" else _detect(first, name)
    parse = _parser(fmt, cfg, first)
    rows = ((where, rec if isinstance(rec, BadRow) else _safe(parse, rec, where)) for where, rec in records)
    return Source(name, fmt, rows)


# -- reading ----------------------------------------------------------------------------
def read_records(dataset: str) -> tuple[str, Iterator[tuple[str, dict | BadRow]]]:
    """The raw records of a file, the sample or a hub dataset: ``(name, (where, record or BadRow)...)``.
    For readers of other row shapes (``chattune.data.questions``)."""
    return _records(dataset)


def _records(dataset: str) -> tuple[str, Iterator[tuple[str, dict | BadRow]]]:
    if dataset == SAMPLE:
        path = resources.files("chattune").joinpath("resources", "sample_arena.jsonl")
        return "sample (built in)", _jsonl(path.read_text(encoding="utf-8").splitlines(), "sample_arena.jsonl")
    path = Path(dataset).expanduser()
    if path.is_symlink() and not path.exists():
        raise UserError(f"--dataset {dataset} is a broken symlink or a symlink loop")
    if path.is_dir():
        raise UserError(f"--dataset {dataset} is a directory; give a .jsonl, .json or .parquet file")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in FILE_SUFFIXES:
            raise UserError(f"{dataset}: unsupported file type '{suffix}'; use .jsonl, .json or .parquet")
        return str(path), _read_file(path, suffix)
    if path.suffix.lower() in FILE_SUFFIXES or dataset.startswith((".", "/", "~")) or not HUB_ID.match(dataset):
        raise UserError(f"--dataset {dataset}: no such file (give a local file, 'sample', or a hub id owner/name)")
    return dataset, _hub(dataset)


def _read_file(path: Path, suffix: str) -> Iterator[tuple[str, dict | BadRow]]:
    try:
        yield from _read_text_or_parquet(path, suffix)
    except OSError as e:  # permission, I/O error, a file replaced by a directory mid-read
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_text_or_parquet(path: Path, suffix: str) -> Iterator[tuple[str, dict | BadRow]]:
    # utf-8-sig: a byte-order mark is not part of the first row; newline="\n": only \n (or
    # \r\n) ends a row, as JSONL says, not a stray \r
    if suffix == ".jsonl":
        with path.open(encoding="utf-8-sig", errors="replace", newline="\n") as f:
            yield from _jsonl(f, str(path))
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig", errors="replace"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); "
                            "one object per line needs the .jsonl suffix") from None
        except (ValueError, RecursionError) as e:
            raise UserError(f"{path}: not usable JSON ({_json_problem(e)})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of rows, got {type(data).__name__}")
        for i, rec in enumerate(data, 1):
            yield f"{path}:{i}", rec if isinstance(rec, dict) else BadRow("not_an_object", type(rec).__name__)
    else:
        yield from _parquet(path)


def _jsonl(lines, name: str) -> Iterator[tuple[str, dict | BadRow]]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue  # blank lines (a trailing newline) are not rows
        where = f"{name}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, BadRow("malformed_json", e.msg)
            continue
        except (ValueError, RecursionError) as e:
            yield where, BadRow("malformed_json", _json_problem(e))
            continue
        yield where, rec if isinstance(rec, dict) else BadRow("not_an_object", type(rec).__name__)


def _json_problem(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).splitlines()[0][:120]  # e.g. an integer of more than 4300 digits


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        n = 0
        for batch in batches:
            for rec in batch.to_pylist():
                n += 1
                yield f"{path}:{n}", rec
    except Exception as e:  # pyarrow raises several types for a corrupt file; all mean the same to the user
        raise UserError(f"{path}: cannot read parquet ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _hub(name: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, gated, no token, unknown id: the user's fix is the same
        raise UserError(
            f"cannot load '{name}' from the Hugging Face hub ({type(e).__name__}). It is gated: accept its licence "
            f"at https://huggingface.co/datasets/{name}, then run `huggingface-cli login` or set HF_TOKEN; "
            "offline, pass a local file with --dataset PATH") from None
    for i, rec in enumerate(ds, 1):
        yield f"{name}:{i}", rec


def _peek(records: Iterator) -> tuple[dict | None, Iterator]:
    """The first readable record (for format detection), and an iterator that still yields it."""
    seen = []
    for item in records:
        seen.append(item)
        if isinstance(item[1], dict):
            return item[1], itertools.chain(seen, records)
    return None, iter(seen)


def _detect(first: dict | None, name: str) -> str:
    if first is None:
        return "messages"  # nothing readable: every row is counted as bad whatever the format
    keys = set(first)
    for fmt, needed in (("arena", {"conversation_a"}), ("arena", {"conversation_b"}), ("messages", {"messages"}),
                        ("sharegpt", {"conversations"}), ("alpaca", {"instruction", "output"}),
                        ("prompt-answers", {"prompt", "answers"}), ("pairs", {"chosen", "rejected"}),
                        ("unpaired", {"completion", "label"})):
        if needed <= keys:
            return fmt
    raise UserError(f"{name}: cannot tell the row format from the keys {sorted(keys)[:8]}; pass --format")


# -- parsing ----------------------------------------------------------------------------
def _safe(parse, rec: dict, where: str) -> Row | BadRow:
    try:
        return parse(rec, where)
    except BadRow as bad:
        return bad


def _parser(fmt: str, cfg: DataConfig, first: dict | None):
    if fmt == "arena":
        return _arena
    if fmt == "messages":
        return lambda rec, where: _single(rec, where, "messages", "role", "content")
    if fmt == "sharegpt":
        return lambda rec, where: _single(rec, where, "conversations", "from", "value")
    if fmt == "alpaca":
        return _alpaca
    if fmt == "pairs":
        return _pair
    if fmt == "unpaired":
        return _unpaired
    if cfg.chosen_model or cfg.rejected_model:
        if not (cfg.chosen_model and cfg.rejected_model):
            raise UserError("prompt-answers pairs need both --chosen-model and --rejected-model")
        return lambda rec, where: _prompt_answer_pair(rec, where, cfg.chosen_model, cfg.rejected_model)
    model = cfg.answer_model or _only_answer_model(first)
    return lambda rec, where: _prompt_answers(rec, where, model)


def _only_answer_model(first: dict | None) -> str | None:
    if first is None:
        return None  # no readable row: nothing to choose for (every row is counted bad)
    models = sorted(first["answers"]) if first and isinstance(first.get("answers"), dict) else []
    if len(models) == 1:
        return models[0]
    if not models:
        return None  # the rows' answers are unusable: each is counted (missing_answer, wrong_type)
    raise UserError("prompt-answers rows hold several answers: choose one with --answer-model, or a pair with "
                    f"--chosen-model and --rejected-model ({', '.join(models) or 'no answers found in the first row'})")


def _check_text(text: str) -> None:
    """JSON's \\ud800 escapes give lone surrogates: text no tokenizer or hash can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow("invalid_text", "a lone surrogate (\\ud800-\\udfff) in the text") from None


ROLES = {"user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


def _messages(raw: Any, role_key: str, text_key: str) -> list[dict]:
    if raw is None:
        raise BadRow("missing_field", "no conversation")
    if not isinstance(raw, list):
        raise BadRow("wrong_type", f"conversation is {type(raw).__name__}, not a list")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRow("wrong_type", f"turn {i} is {type(m).__name__}, not an object")
        if role_key not in m or text_key not in m:
            raise BadRow("missing_field", f"turn {i} lacks '{role_key}' or '{text_key}'")
        role, text = m[role_key], m[text_key]
        if not isinstance(role, str) or not isinstance(text, str):
            raise BadRow("wrong_type", f"turn {i}: '{role_key}' and '{text_key}' must be strings")
        _check_text(text)
        if role.lower() not in ROLES:
            raise BadRow("unknown_role", f"turn {i} has role {role!r}")
        out.append({"role": ROLES[role.lower()], "content": text})
    return out


def _side(rec: dict, key: str) -> list[dict] | BadRow:
    if rec.get(key) is None:
        return BadRow("missing_side", f"no '{key}'")
    try:
        return _messages(rec[key], "role", "content")
    except BadRow as bad:
        return bad


def _row_id(rec: dict, where: str, *keys: str) -> str:
    for key in keys:
        if isinstance(rec.get(key), (str, int)):
            return str(rec[key])
    return where


def _arena(rec: dict, where: str) -> Row:
    language = rec.get("language")
    if language is not None and not isinstance(language, str):
        raise BadRow("wrong_type", "'language' must be a string")
    sides = {"a": _side(rec, "conversation_a"), "b": _side(rec, "conversation_b")}
    return Row(where, _row_id(rec, where, "question_id", "id"), sides, rec.get("winner"), language,
               _flagged(rec))


def _flagged(rec: dict) -> bool:
    """Flagged by OpenAI moderation or by either toxic-chat model; absent tags count as not flagged."""
    tags = [rec.get("openai_moderation")]
    toxic = rec.get("toxic_chat_tag")
    if toxic is not None and not isinstance(toxic, dict):
        raise BadRow("wrong_type", "'toxic_chat_tag' must be an object")
    tags += list((toxic or {}).values())
    flagged = False
    for tag in tags:
        if tag is None:
            continue
        if not isinstance(tag, dict) or not isinstance(tag.get("flagged", False), bool):
            raise BadRow("wrong_type", "moderation tags must be objects with a boolean 'flagged'")
        flagged = flagged or tag.get("flagged", False)
    return flagged


def _single(rec: dict, where: str, key: str, role_key: str, text_key: str) -> Row:
    if key not in rec:
        raise BadRow("missing_field", f"no '{key}'")
    language = rec.get("language") if isinstance(rec.get("language"), str) else None
    return Row(where, _row_id(rec, where, "id", "question_id"), {None: _messages(rec[key], role_key, text_key)},
               language=language)


def _alpaca(rec: dict, where: str) -> Row:
    if "instruction" not in rec or "output" not in rec:
        raise BadRow("missing_field", "alpaca rows need 'instruction' and 'output'")
    instruction, extra, output = rec["instruction"], rec.get("input") or "", rec["output"]
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        raise BadRow("wrong_type", "'instruction', 'input' and 'output' must be strings")
    for text in (instruction, extra, output):
        _check_text(text)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Row(where, _row_id(rec, where, "id"), {None: [{"role": "user", "content": prompt},
                                                         {"role": "assistant", "content": output}]})


def _prompt_answers(rec: dict, where: str, model: str) -> Row:
    if "prompt" not in rec or "answers" not in rec:
        raise BadRow("missing_field", "prompt-answers rows need 'prompt' and 'answers'")
    prompt, answers = rec["prompt"], rec["answers"]
    if not isinstance(prompt, str) or not isinstance(answers, dict):
        raise BadRow("wrong_type", "'prompt' must be a string and 'answers' an object")
    if answers.get(model) is None:
        raise BadRow("missing_answer", f"no answer from '{model}'")
    if not isinstance(answers[model], str):
        raise BadRow("wrong_type", f"the answer from '{model}' is not a string")
    _check_text(prompt)
    _check_text(answers[model])
    return Row(where, _row_id(rec, where, "id", "question_id"), {None: [{"role": "user", "content": prompt},
                                                                       {"role": "assistant", "content": answers[model]}]})


def _prompt_answer_pair(rec: dict, where: str, chosen: str, rejected: str) -> Row:
    sides: dict = {}
    for side, model in (("a", chosen), ("b", rejected)):
        try:
            sides[side] = _prompt_answers(rec, where, model).sides[None]
        except BadRow as bad:  # counted under its reason when the pair is selected
            sides[side] = bad
    return Row(where, _row_id(rec, where, "id", "question_id"), sides, winner="model_a")


def _pair(rec: dict, where: str) -> Row:
    """{"prompt", "chosen", "rejected"}: strings, or message lists (TRL's conversational form,
    the prompt optional when chosen and rejected are whole conversations)."""
    if "chosen" not in rec or "rejected" not in rec:
        raise BadRow("missing_field", "pair rows need 'chosen' and 'rejected'")
    head = _prompt_head(rec.get("prompt"))
    sides = {}
    for side, key in (("a", "chosen"), ("b", "rejected")):
        answer = rec[key]
        if isinstance(answer, str):
            if not head:
                raise BadRow("missing_field", f"'{key}' is a string but there is no 'prompt'")
            sides[side] = head + [{"role": "assistant", "content": answer}]
        else:
            sides[side] = head + _messages(answer, "role", "content")
    return Row(where, _row_id(rec, where, "id", "question_id"), sides, winner="model_a")


def _prompt_head(prompt: Any) -> list[dict]:
    """The turns before the answer of a pair or unpaired row: none, one user string, or messages."""
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return _messages(prompt, "role", "content")


def _unpaired(rec: dict, where: str) -> Row:
    """{"prompt", "completion", "label"}: one answer with a thumbs up (true) or down (false),
    TRL's unpaired preference format (strings, or message lists as in ``_pair``)."""
    if "completion" not in rec or "label" not in rec:
        raise BadRow("missing_field", "unpaired rows need 'completion' and 'label'")
    if not isinstance(rec["label"], bool):
        raise BadRow("wrong_type", "'label' must be true or false")
    head, completion = _prompt_head(rec.get("prompt")), rec["completion"]
    if isinstance(completion, str):
        if not head:
            raise BadRow("missing_field", "'completion' is a string but there is no 'prompt'")
        _check_text(completion)
        messages = head + [{"role": "assistant", "content": completion}]
    else:
        messages = head + _messages(completion, "role", "content")
    return Row(where, _row_id(rec, where, "id", "question_id"), {None: messages}, label=rec["label"])
