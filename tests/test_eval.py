"""chattune eval: prompt files (MT-Bench, Arena-Hard, training formats), tuned and base
under two decodings, metrics with intervals, answer files, exports and the LLM judge."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from chattune.cli import main
from chattune.data.questions import read_questions
from chattune.errors import UserError
from chattune.evaluate.judge import lc_win_rate, parse_verdict
from chattune.evaluate.metrics import Bootstrap, answer_metrics, paired_stops
from tiny import make_tokenizer, tiny_dirs  # noqa: F401  (fixture)

FIXTURES = Path(__file__).parent / "fixtures"
ARENA_HARD = FIXTURES / "arena_hard_questions.jsonl"
MTBENCH = FIXTURES / "mtbench_questions.jsonl"


@pytest.fixture(scope="module")
def run_dir(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["train", "--model", str(tiny_dirs["gpt2"]), "--max-steps", "2", "--output-dir", str(out),
                 "--max-length", "128"]) == 0
    return out


def evaluate(run_dir, out: Path, *extra: str, capsys=None) -> dict:
    assert main(["eval", str(run_dir), "--max-new-tokens", "6", "--output-dir", str(out), "--json", *extra]) == 0
    result = json.loads((out / "result.json").read_text())
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    return {"result": result, "answers": answers}


# -- prompt files -------------------------------------------------------------------------------
def test_arena_hard_reader_counts_bad_rows_and_picks_the_baseline_reference():
    qs = read_questions(str(ARENA_HARD))
    assert qs.format == "arena-hard" and qs.reference_model == "gpt-4-0314"
    assert [q.id for q in qs.questions] == ["q-abc", "q-python", "q-sky", "q-rome"]
    assert qs.dropped == Counter({"empty_turn": 1, "malformed_json": 1}) and qs.rows_read == 6
    assert qs.questions[2].reference is None and qs.without_reference == 1
    other = read_questions(str(ARENA_HARD), reference_model="gpt-3.5-turbo-0125")
    assert other.questions[2].reference == "Rayleigh scattering of sunlight." and other.without_reference == 0


def test_arena_hard_with_several_answer_models_and_no_baseline_asks_which(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"uid": "u1", "prompt": "hi", "answers": {"m1": "a", "m2": "b"}}) + "\n")
    with pytest.raises(UserError, match="--reference-model"):
        read_questions(str(path))
    qs = read_questions(str(path), reference_model="m2")
    assert qs.id_key == "uid" and qs.questions[0].reference == "b"


def test_mtbench_reader_first_or_all_turns():
    first = read_questions(str(MTBENCH))
    assert first.format == "mtbench" and [q.raw_id for q in first.questions] == [81, 111, 131]
    assert all(len(q.turns) == 1 for q in first.questions) and first.dropped == Counter({"missing_field": 1})
    both = read_questions(str(MTBENCH), turns="all")
    assert [len(q.turns) for q in both.questions] == [2, 2, 1]
    assert both.questions[1].reference == "3 times 4 is 12."


def test_training_formats_are_read_as_prompts():
    qs = read_questions(str(FIXTURES / "messages.jsonl"))
    assert qs.format == "messages" and len(qs.questions) > 2 and all(q.reference for q in qs.questions)
    ids = [q.id for q in qs.questions]
    picked = [q.id for q in qs.select(2).questions]
    assert len(picked) == 2 and picked == [i for i in ids if i in picked]  # file order kept


def test_selection_is_stable_and_spread(tmp_path):
    """A file sorted by topic still gives a spread of topics: the pick follows a hash of the
    ids, not their place in the file, and keeps file order."""
    rows = [{"id": f"{topic}-{i}", "category": "arena-hard-v0.1", "cluster": topic, "prompt": f"{topic} question {i}?",
             "answers": {"gpt-4-0314": "an answer"}} for topic in ("music", "code", "maths", "history") for i in range(10)]
    for name, ordered in (("sorted", rows), ("reversed", rows[::-1])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ordered))
    picked = [[q.id for q in read_questions(str(tmp_path / f"{name}.jsonl")).select(8).questions]
              for name in ("sorted", "sorted", "reversed")]
    assert picked[0] == picked[1] and len(picked[0]) == 8  # stable
    assert len({i.split("-")[0] for i in picked[0]}) >= 3  # the head of the sorted file is one topic
    assert picked[2] == picked[0][::-1]  # the same questions whatever their place, in file order


# -- metrics --------------------------------------------------------------------------------------
def row(prompt, finish, tokens, turn=0, text="x", reference=None):
    return {"prompt": prompt, "turn": turn, "finish": finish, "tokens": tokens, "text": text, "reference": reference}


def test_answer_metrics_rates_and_intervals():
    loop = [1, 2, 3, 4] * 10
    rows = [row(0, "eos", list(range(10))), row(1, "stop", list(range(20))),
            row(2, "length", loop, text="I can help. " * 10),
            row(3, "eos", list(range(30)), text="the capital is rome", reference="rome is the capital")]
    m = answer_metrics(rows, 4, ref_median=20.0)
    assert (m["eos_share"], m["new_turn_share"], m["cut_share"], m["loop_share"]) == (0.5, 0.25, 0.25, 0.25)
    assert m["median_length"] == 25.0 and m["length_ratio"] == 1.25
    for key in ("eos_share", "loop_share", "rep4", "median_length"):
        lo, hi = m["ci"][key]
        assert lo <= m[key] <= hi and lo < hi, key
    assert 0 < m["rouge_l"] < 1


def test_bootstrap_interval_narrows_with_more_prompts():
    rng = np.random.default_rng(1)
    small = rng.random(20) < 0.5
    large = rng.random(2000) < 0.5
    w_small = np.diff(Bootstrap(list(range(20)), 20).mean(small))[0]
    w_large = np.diff(Bootstrap(list(range(2000)), 2000).mean(large))[0]
    assert w_large < w_small / 5


def test_paired_stop_counts():
    tuned = [row(0, "eos", []), row(1, "eos", []), row(2, "length", [])]
    base = [row(0, "length", []), row(1, "eos", []), row(2, "eos", [])]
    assert paired_stops(tuned, base) == {"pairs": 3, "tuned_stops_base_not": 1, "base_stops_tuned_not": 1}


def test_verdict_parsing():
    assert parse_verdict("long reasoning... My final verdict is [[A>>B]].") == "A>>B"
    assert parse_verdict("[[B>A]] then again [[B>A]]") == "B>A"
    assert parse_verdict("[[A>B]] or maybe [[B>A]]") is None
    assert parse_verdict("no label") is None and parse_verdict("[[C>A]]") is None


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    # the judge prefers the longer answer and nothing else: raw win rate 75%, at equal length ~50%
    diff = np.array([100.0, 80, 60, 40, -40, -60, 90, 70])
    y = (diff > 0).astype(float)
    y_noisy = np.concatenate([y, [1.0, 0.0]])
    d = np.concatenate([diff, [0.0, 0.0]])
    assert y_noisy.mean() == 0.7
    assert abs(lc_win_rate(y_noisy, d) - 0.5) < 0.1
    # a model that wins whatever the lengths keeps a high rate
    assert lc_win_rate(np.array([1.0, 1, 1, 0.5, 1, 1]), np.array([-50.0, 20, -10, 0, 30, -30])) > 0.8


# -- the command ----------------------------------------------------------------------------------
def test_eval_on_arena_hard_file_writes_every_answer_and_paired_numbers(run_dir, tmp_path):
    out = evaluate(run_dir, tmp_path / "e", "--prompts", str(ARENA_HARD), "--export-answers", "arena-hard")
    result, answers = out["result"], out["answers"]
    assert len(answers) == 4 * 2 * 2  # prompts x (tuned, base) x (sampled, greedy)
    assert Counter((a["model"], a["decoding"]) for a in answers) == Counter(
        {(m, d): 4 for m in ("tuned", "base") for d in ("sampled", "greedy")})
    for a in answers:
        assert set(a) >= {"prompt_id", "model", "decoding", "text", "stopped", "tokens", "finish_reason"}
        assert a["stopped"] == (a["finish_reason"] == "eos") and 0 <= a["tokens"] <= 6
    for model in ("tuned", "base"):
        for d in ("sampled", "greedy"):
            cell = result[model][d]
            mine = [a for a in answers if a["model"] == model and a["decoding"] == d]
            assert cell["eos_share"] == sum(a["stopped"] for a in mine) / 4
            assert cell["answers"] == 4 and "rouge_l" in cell
        assert result[model]["loss_tokens"] > 0 and result[model]["loss_ci"][0] <= result[model]["loss"]
    for d in ("sampled", "greedy"):
        by = {(a["prompt_id"], a["model"]): a["stopped"] for a in answers if a["decoding"] == d}
        want = sum(by[(p, "tuned")] and not by[(p, "base")] for p, m in by if m == "tuned")
        assert result["paired"][d]["tuned_stops_base_not"] == want
    assert result["reference"]["answers"] == 3 and result["prompts"]["dropped"] == {"empty_turn": 1, "malformed_json": 1}
    export = tmp_path / "e" / "arena-hard" / "arena-hard-v0.1" / "model_answer"
    assert sorted(p.name for p in export.iterdir()) == ["run-base-greedy.jsonl", "run-base.jsonl",
                                                        "run-tuned-greedy.jsonl", "run-tuned.jsonl"]
    line = json.loads((export / "run-tuned.jsonl").read_text().splitlines()[0])
    assert line["question_id"] == "q-abc" and line["model_id"] == "run-tuned"
    assert isinstance(line["choices"][0]["turns"][0]["content"], str)


def test_eval_floor_counts_the_work_the_eval_did(run_dir, tmp_path):
    """benchmarks/eval_floor.py on a real eval's output: its counts, never its timings."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import eval_floor

    from chattune.generate.loaded import load_run

    out = evaluate(run_dir, tmp_path / "e", "--prompts", str(ARENA_HARD))
    run = load_run(run_dir)
    work = eval_floor.count(run, tmp_path / "e")
    answers = out["answers"]
    assert work["answers"] == 16 and work["models"] == ["base", "tuned"]
    assert work["decode_steps"] == sum(max(a["tokens"] - 1, 0) for a in answers)
    assert len(work["prompt_tokens"]) == 4 * 2  # (model, prompt): sampled and greedy share the prefill
    assert len(work["reference_tokens"]) == 3 * 2  # q-sky has no reference answer
    shape = eval_floor.model_shape(run.model)
    c = run.model.get_base_model().config
    assert shape["cache_bytes_per_position"] == 2 * c.n_layer * c.n_embd * 4
    assert shape["linear_weights"] > 0 and shape["head_weights"] == c.vocab_size * c.n_embd
    phases = eval_floor.floor(work, shape, flops=1e9, bandwidth=1e9)
    assert all(v > 0 for v in phases.values()), phases
    assert eval_floor.floor(work, shape, flops=2e9, bandwidth=1e9)["prefill"] < phases["prefill"]
    # a bf16 run's loss runs under autocast (its own peak); decode and prefill stay float32
    faster_loss = eval_floor.floor(work, shape, flops=1e9, bandwidth=1e9, loss_flops=4e9)
    assert faster_loss["reference_loss"] == pytest.approx(phases["reference_loss"] / 4)
    assert {k: v for k, v in faster_loss.items() if k != "reference_loss"} == \
        {k: v for k, v in phases.items() if k != "reference_loss"}


def test_sampled_answers_are_reproducible_and_differ_from_greedy(run_dir, tmp_path):
    args = ("--prompts", str(MTBENCH), "--no-base", "--max-new-tokens", "12")
    a = evaluate(run_dir, tmp_path / "a", *args)["answers"]
    b = evaluate(run_dir, tmp_path / "b", *args)["answers"]
    assert [x["text"] for x in a] == [x["text"] for x in b]
    sampled = [x["text"] for x in a if x["decoding"] == "sampled"]
    greedy = [x["text"] for x in a if x["decoding"] == "greedy"]
    assert sampled != greedy


def test_mtbench_second_turns_and_export(run_dir, tmp_path):
    out = evaluate(run_dir, tmp_path / "m", "--prompts", str(MTBENCH), "--turns", "all", "--decodings", "sampled",
                   "--export-answers", "mtbench")
    turns = Counter((a["prompt_id"], a["model"]) for a in out["answers"])
    assert turns == Counter({(81, "tuned"): 2, (81, "base"): 2, (111, "tuned"): 2, (111, "base"): 2,
                             (131, "tuned"): 1, (131, "base"): 1})
    assert "greedy" not in out["result"]["tuned"]
    lines = (tmp_path / "m" / "mtbench" / "mt_bench" / "model_answer" / "run-tuned.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["question_id"] == 81 and len(first["choices"][0]["turns"]) == 2


def test_alpaca_eval_export(run_dir, tmp_path):
    evaluate(run_dir, tmp_path / "x", "--prompts", str(ARENA_HARD), "--decodings", "greedy", "--export-answers",
             "alpaca-eval", "--no-base")
    rows = json.loads((tmp_path / "x" / "alpaca-eval" / "run-tuned.json").read_text())
    assert len(rows) == 4 and set(rows[0]) == {"instruction", "output", "generator"}
    assert rows[0]["instruction"] == "Use ABC notation to write a short folk melody."


def test_prompt_longer_than_the_context_is_skipped_and_counted(run_dir, tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"id": "long", "prompt": "word " * 2000, "answers": {"gpt-4-0314": "x"}},
            {"id": "short", "prompt": "Hello there", "answers": {"gpt-4-0314": "Hello!"}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = evaluate(run_dir, tmp_path / "o", "--prompts", str(path), "--decodings", "greedy", "--no-base")
    result = out["result"]
    assert result["prompts"]["skipped"] == {"prompt_too_long": 1} and result["prompts"]["used"] == 1
    assert [a["prompt_id"] for a in out["answers"]] == ["short"] and result["samples"] == 1


def test_chat_template_end_and_new_turn_tokens_end_answers(tiny_dirs):
    from conftest import CHATML

    from chattune.data import turn_token_ids
    from chattune.engine import GREEDY, Engine, Request, Variant
    from tiny import make_model

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    end_ids, stop_ids = turn_token_ids(tok, "chat")
    assert end_ids == (tok.convert_tokens_to_ids("<|im_end|>"),)
    assert stop_ids == (tok.convert_tokens_to_ids("<|im_start|>"),)
    assert turn_token_ids(tok, "seed") == ((), ())
    model = make_model("gpt2", len(tok)).eval()
    engine = Engine({"tuned": Variant(model)}, tok, eos_id=-1)
    prompt = tok("Hello there", add_special_tokens=False)["input_ids"]
    free = engine.run([Request(prompt, 8, GREEDY)])[0].token_ids
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # a token not generated before
    stop = engine.run([Request(prompt, 8, GREEDY, stop_ids=(free[k],))])[0]
    end = engine.run([Request(prompt, 8, GREEDY, end_ids=(free[k],))])[0]
    assert stop.finish_reason == "stop" and end.finish_reason == "eos"
    assert stop.token_ids == end.token_ids == free[:k]


# -- the judge ------------------------------------------------------------------------------------
class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that prefers the longer answer, and gives
    no verdict for the prompt about the sky."""

    requests: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        text = body["messages"][-1]["content"]
        a = text.split("<|The Start of Assistant A's Answer|>\n")[1].split("\n<|The End of Assistant A's Answer|>")[0]
        b = text.split("<|The Start of Assistant B's Answer|>\n")[1].split("\n<|The End of Assistant B's Answer|>")[0]
        if "sky" in text:
            verdict = "I cannot decide."
        else:
            verdict = "[[A>B]]" if len(a) > len(b) else "[[B>A]]" if len(b) > len(a) else "[[A=B]]"
        reply = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": f"Verdict: {verdict}"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    FakeJudge.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_judge_both_orders_unparseable_counted_and_cached(run_dir, tmp_path, judge_server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret")
    args = ("--prompts", str(ARENA_HARD), "--decodings", "sampled", "--max-new-tokens", "10", "--judge-url",
            judge_server, "--judge-model", "fake-judge", "--judge-key-env", "JUDGE_KEY")
    out = evaluate(run_dir, tmp_path / "j", *args)
    j = out["result"]["judge"]
    text = {(a["prompt_id"], a["model"]): a["text"] for a in out["answers"]}
    # both orders of each of the 4 pairs; two equal answers make the two orders one request
    distinct = sum(1 if text[(p, "tuned")] == text[(p, "base")] else 2 for p in ("q-abc", "q-python", "q-sky", "q-rome"))
    assert len(FakeJudge.requests) == j["new_requests"] == distinct and j["judgements"] == 8
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer secret" for r in FakeJudge.requests)
    assert j["unparseable"] == 2  # the sky prompt, in both orders
    # the fake judge prefers the longer answer: recompute the win rate from the answers themselves
    scores = []
    for pid in ("q-abc", "q-python", "q-rome"):
        t, b = len(text[(pid, "tuned")]), len(text[(pid, "base")])
        scores += [1.0 if t > b else 0.0 if b > t else 0.5] * 2
    assert j["win_rate"] == pytest.approx(sum(scores) / 6)
    assert 0 <= j["lc_win_rate"] <= 1 and j["win_rate_ci"][0] <= j["win_rate"] <= j["win_rate_ci"][1]
    again = evaluate(run_dir, tmp_path / "j", *args)["result"]["judge"]
    assert len(FakeJudge.requests) == distinct and again["new_requests"] == 0  # every verdict came from the cache
    assert again["win_rate"] == j["win_rate"]


def test_unreachable_judge_is_one_line_and_exit_2_before_decoding(run_dir, tmp_path, capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    code = main(["eval", str(run_dir), "--prompts", str(ARENA_HARD), "--judge-url", f"http://127.0.0.1:{port}/v1",
                 "--judge-model", "x", "--output-dir", str(tmp_path / "u")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unreachable" in err[0]
    assert not (tmp_path / "u" / "answers.jsonl").exists()


def test_missing_key_variable_fails_first(run_dir, tmp_path, capsys, judge_server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    code = main(["eval", str(run_dir), "--prompts", str(ARENA_HARD), "--judge-url", judge_server,
                 "--judge-model", "x", "--judge-key-env", "NO_SUCH_KEY_VAR", "--output-dir", str(tmp_path / "k")])
    assert code == 2 and "NO_SUCH_KEY_VAR" in capsys.readouterr().err and not FakeJudge.requests


def test_bad_prompt_file_is_one_line(run_dir, tmp_path, capsys):
    assert main(["eval", str(run_dir), "--prompts", str(tmp_path / "none.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
