"""Hostile data files, generated here in every row format and file type: never a traceback,
every row accounted for (``rows_read == rows_kept + sum(dropped)``), and a file with no usable
row ends `train` in one line with exit 2."""

from __future__ import annotations

import json
import os

import pytest

from chattune.cli import main
from tiny import tiny_dirs  # noqa: F401  (fixture)

FORMATS = ["arena", "messages", "sharegpt", "alpaca", "prompt-answers"]
CONVERSATION_KEY = {"arena": "conversation_a", "messages": "messages", "sharegpt": "conversations",
                    "alpaca": "instruction", "prompt-answers": "answers"}


def row(fmt: str, q, a, n: int = 0) -> dict:
    """One row of ``fmt`` with question ``q`` and answer ``a`` (any JSON values)."""
    if fmt == "arena":
        turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"question_id": f"q{n}", "winner": "model_a", "conversation_a": turns, "conversation_b": turns}
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if fmt == "alpaca":
        return {"instruction": q, "input": "", "output": a}
    return {"prompt": q, "answers": {"m": a}}


def good(fmt: str, n: int) -> dict:
    return row(fmt, f"Question number {n}: what is {n} + {n}?", f"It is {2 * n}, as {n} + {n} = {2 * n}.", n)


def wrong_types(fmt: str) -> list:
    """Rows with a wrong type at every level: the row, the conversation, a turn, a field."""
    key = CONVERSATION_KEY[fmt]
    rows: list = [[], 3, "a string", None, True]
    for bad in ("text", 5, {"x": 1}, None, [1, 2]):
        if not (fmt == "alpaca" and bad == "text"):  # an alpaca instruction is text
            rows.append({**good(fmt, 90), key: bad})
    for q in (5, [], {"a": "b"}, None, ["nested", ["list"]]):
        rows.append(row(fmt, q, "an answer long enough", 91))
    if fmt in ("arena", "messages", "sharegpt"):
        r = good(fmt, 92)
        r[key] = ["a turn that is a string", 7]
        rows.append(r)
        r = good(fmt, 93)
        r[key] = [{"role" if fmt != "sharegpt" else "from": 5, "content" if fmt != "sharegpt" else "value": "x"}]
        rows.append(r)
    if fmt == "arena":
        rows += [{**good(fmt, 94), "winner": [1]}, {**good(fmt, 95), "language": 5},
                 {**good(fmt, 96), "toxic_chat_tag": "x"}, {**good(fmt, 97), "openai_moderation": {"flagged": "yes"}}]
    if fmt == "alpaca":
        rows.append({**good(fmt, 94), "input": ["x"]})
    return rows


def lines(records: list) -> list[bytes]:
    return [json.dumps(r, ensure_ascii=False).encode() for r in records]


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def body(fmt: str, case: str) -> tuple[list[bytes], int]:
    """JSON texts of the rows between two good ones, and how many of them are usable."""
    if case == "truncated":
        text = json.dumps(good(fmt, 50)).encode()
        return [text[: len(text) // 2]], 0
    if case == "wrong_types":
        return lines(wrong_types(fmt)), 0
    if case == "huge_string":
        # read, then dropped as looping_answer: ten million times "a" is a loop
        return lines([row(fmt, "A question about a long answer?", "a" * 10_000_000, 50)]), 0
    if case == "deep":
        bomb = json.dumps(good(fmt, 50)).replace('"Question number 50: what is 50 + 50?"', deep(100_000))
        return [bomb.encode()] + lines([row(fmt, json.loads(deep(200)), "an answer", 51)]), 0
    if case == "nul":
        raw = json.dumps(good(fmt, 51)).replace("Question", "Ques\x00tion").encode()
        return lines([row(fmt, "with a NUL \x00 inside?", "yes, \x00 here", 50)]) + [raw], 1
    if case == "invalid_utf8":
        return [json.dumps(good(fmt, 50)).replace("Question", "Ques@@tion").encode().replace(b"@@", b"\xff\xfe\xc3")], 1
    if case == "line_separators":
        return lines([row(fmt, "line\u2028separator\u2029para\x85nel?", "answer\u2028with\u2028separators", 50)]), 1
    if case == "surrogate":
        return [json.dumps(good(fmt, 50)).replace("Question", "\\ud800Question").encode()], 0
    if case == "huge_number":
        return [json.dumps(good(fmt, 50))[:-1].encode() + b', "n": 1' + b"0" * 5000 + b"}"], 0
    raise AssertionError(case)


CASES = ["truncated", "wrong_types", "huge_string", "deep", "nul", "invalid_utf8", "line_separators",
         "surrogate", "huge_number", "bom", "crlf", "empty"]
# cases where a .json file (one document) cannot be parsed at all: one line, exit 2
JSON_FATAL = {"truncated", "deep", "nul", "huge_number", "empty"}


def write_text_file(path, fmt: str, case: str) -> tuple[int, int] | None:
    """Write ``path`` (.jsonl or .json); returns (rows, usable rows), None when it must end in exit 2."""
    if case in ("bom", "crlf", "empty"):
        inner, usable = [], 0
    else:
        inner, usable = body(fmt, case)
    rows = [json.dumps(good(fmt, 1)).encode(), *inner, json.dumps(good(fmt, 2)).encode()]
    if case == "empty":
        rows = []
    if path.suffix == ".json":
        data = b"[" + b",\n".join(rows) + b"]" if rows else b""
        if case == "truncated":
            data = data[: len(data) // 2]
    else:
        data = b"".join(r + b"\n" for r in rows)
    if case == "crlf":
        data = data.replace(b"\n", b"\r\n")
    if case == "bom":
        data = b"\xef\xbb\xbf" + data
    path.write_bytes(data)
    if path.suffix == ".json" and case in JSON_FATAL:
        return None
    n_rows = len(rows)
    return n_rows, usable + (2 if rows else 0)


def data_cli(path, fmt: str, capsys) -> tuple[int, dict | None, list[str]]:
    code = main(["data", "--dataset", str(path), "--format", fmt, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err.strip().splitlines()


def check(code: int, out, err: list[str], expect) -> None:
    if expect is None:
        assert code == 2 and len(err) == 1 and err[0].startswith("chattune: error:"), err
        return
    assert code == 0, err
    rows, usable = expect
    assert out["rows_read"] == rows
    assert out["rows_read"] == out["rows_kept"] + sum(out["dropped"].values())
    assert out["rows_kept"] == usable, out["dropped"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_hostile_text_files(tmp_path, capsys, fmt, case, suffix):
    path = tmp_path / f"rows{suffix}"
    expect = write_text_file(path, fmt, case)
    check(*data_cli(path, fmt, capsys), expect)


def parquet_table(fmt: str, case: str):
    """A parquet file's rows for ``case``: (records or a pyarrow table, usable rows)."""
    import pyarrow as pa

    goods = [good(fmt, 1), good(fmt, 2)]
    key = CONVERSATION_KEY[fmt]
    if case == "wrong_types":  # a column of the wrong type in every row
        return pa.table({key: pa.array([5, 6], pa.int64())}), 0
    if case == "wrong_inner_types":
        return [row(fmt, 5, 6, 1), row(fmt, 7, 8, 2)], 0
    if case == "huge_string":
        return goods + [row(fmt, "A question about a long answer?", "a" * 10_000_000, 3)], 2  # the loop dropped
    if case == "deep":
        return [row(fmt, json.loads(deep(40)), json.loads(deep(40)), n) for n in (1, 2)], 0  # pyarrow reads 100 levels
    if case == "nul":
        return goods + [row(fmt, "with a NUL \x00 inside?", "yes, \x00 here", 3)], 3
    if case == "binary":  # invalid UTF-8 can only be stored as bytes
        return pa.table({key: pa.array([b"\xff\xfe", b"\xc3"], pa.binary())}), 0
    if case == "line_separators":
        return goods + [row(fmt, "line\u2028separator\u2029para?", "answer\u2028with\u2028them", 3)], 3
    if case == "no_rows":
        return pa.table({key: pa.array([], pa.string())}), 0
    raise AssertionError(case)


PARQUET_CASES = ["wrong_types", "wrong_inner_types", "huge_string", "deep", "nul", "binary", "line_separators",
                 "no_rows", "truncated", "empty", "garbage"]


@pytest.mark.parametrize("case", PARQUET_CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_hostile_parquet_files(tmp_path, capsys, fmt, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    expect = None
    if case in ("truncated", "empty", "garbage"):
        pq.write_table(pa.Table.from_pylist([good(fmt, 1), good(fmt, 2)]), path)
        data = path.read_bytes()
        path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"PAR1" + b"\xff" * 64}[case])
    else:
        table, usable = parquet_table(fmt, case)
        if isinstance(table, list):
            try:
                table = pa.Table.from_pylist(table)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pytest.skip("pyarrow cannot store these rows in one column type")
        pq.write_table(table, path)
        expect = (table.num_rows, usable)
    check(*data_cli(path, fmt, capsys), expect)


@pytest.mark.parametrize("kind", ["directory", "symlink_loop", "broken_symlink", "unreadable"])
def test_unopenable_paths_are_one_line(tmp_path, capsys, kind):
    path = tmp_path / "rows.jsonl"
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink_loop":
        os.symlink(path, path)
    elif kind == "broken_symlink":
        os.symlink(tmp_path / "gone.jsonl", path)
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        path.write_text(json.dumps(good("messages", 1)) + "\n")
        path.chmod(0)
    code, _, err = data_cli(path, "auto", capsys)
    check(code, None, err, None)
    assert str(path) in err[0]


@pytest.mark.parametrize("case", ["empty", "wrong_types", "deep", "surrogate", "huge_number"])
def test_train_on_a_file_without_usable_rows_is_one_line(tiny_dirs, tmp_path, capsys, case):
    path = tmp_path / "rows.jsonl"
    records = [] if case == "empty" else body("messages", case)[0]
    path.write_bytes(b"".join(r + b"\n" for r in records))
    code = main(["train", "--model", str(tiny_dirs["gpt2"]), "--dataset", str(path), "--format", "messages",
                 "--max-steps", "1", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("chattune: error:"), err
    assert not (tmp_path / "run").exists()  # the run lock's directory is not left behind
