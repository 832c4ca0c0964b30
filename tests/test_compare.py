"""``chattune compare`` end to end on a tiny GPT-2: the files, their numbers against each
run's own files, the HTML report, resuming, a failing method, and user mistakes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chattune.cli import main
from tiny import tiny_dirs  # noqa: F401  (fixture)

MAX_STEPS = 3


def compare_args(model: Path, out: Path, methods: str = "ia3,lora,prompt", *extra: str) -> list[str]:
    # ia3 on a module that does not exist fails inside its subprocess, after the parent checked the config
    return ["compare", "--model", str(model), "--dataset", "sample", "--methods", methods,
            "--max-steps", str(MAX_STEPS), "--max-length", "256", "--batch-size", "2", "--lr", "1e-2",
            "--precision", "fp32", "--output-dir", str(out), "--set", "method.ia3.target_modules=[nope]",
            "--set", "eval.num_generate=2", "--set", "eval.max_new_tokens=8", "--set", "compare.eval_points=2",
            *extra]


@pytest.fixture(scope="module")
def compared(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    args = compare_args(tiny_dirs["gpt2"], out)
    code = main(args)
    return {"out": out, "args": args, "code": code, "results": json.loads((out / "results.json").read_text())}


def rows(results: dict) -> dict[str, dict]:
    return {r["method"]: r for r in results["methods"]}


def read(path: Path):
    return json.loads(path.read_text())


def test_writes_every_output(compared):
    out = compared["out"]
    assert compared["code"] == 1  # one method failed
    for name in ("compare.yaml", "results.json", "results.csv", "results.md", "report.html", "base.json",
                 "plots/val_loss.png", "plots/loss_vs_params.png", "plots/speed_memory.png",
                 "lora/result.json", "prompt/result.json", "logs/ia3.log"):
        assert (out / name).is_file(), name
    assert not (out / "ia3" / "result.json").exists()
    assert (out / "plots/val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_numbers_are_finite_and_match_each_runs_own_files(compared):
    out, results = compared["out"], compared["results"]
    budget = results["settings"]["budget"]["max_tokens"]
    for method, row in rows(results).items():
        if method == "ia3":
            continue
        run = out / method
        summary, info = read(run / "summary.json"), read(run / "run_info.json")
        test = read(run / "eval_test.json")["tuned"]
        answers = test["sampled"]  # the headline decoding only: compare does not decode greedily
        evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
        for key in ("trainable_params", "final_train_loss", "peak_memory_mb", "tokens_per_s", "steps", "tokens"):
            assert row[key] == summary[key], key
        assert row["trainable_share"] == info["trainable_share"] and 0 < row["trainable_share"] < 0.5
        assert (row["val_loss"], row["val_ppl"]) == (evals[-1]["val_loss"], evals[-1]["val_ppl"])
        assert row["val_curve"] == [[e["step"], e["val_loss"]] for e in evals] and evals[-1]["step"] == row["steps"]
        assert (row["test_loss"], row["test_ppl"]) == (test["loss"], test["ppl"])
        for key in ("eos_share", "loop_share", "rep4", "distinct_2", "rouge_l", "median_length"):
            assert row[key] == answers[key], key
        assert "greedy" not in test
        assert row["samples"] == answers["samples"] and len(row["samples"]) == 2
        numbers = [v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        assert all(math.isfinite(v) for v in numbers)
        # the same token budget: reached, and overshot by less than one step
        assert budget <= row["tokens"] < budget + 2 * 256  # batch size x max length
    lora, prompt = rows(results)["lora"], rows(results)["prompt"]
    assert lora["steps"] == MAX_STEPS  # --max-steps is counted in packed steps
    assert prompt["steps"] >= MAX_STEPS and prompt["trainable_params"] < lora["trainable_params"]
    assert lora["val_loss"] < results["base"]["val_loss"]


def test_base_row_is_computed_once_with_the_method_off(compared, tiny_dirs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chattune.data import prepare
    from chattune.training.passes import loss_on_samples
    from chattune.generate.loaded import load_run

    out, base = compared["out"], compared["results"]["base"]
    cfg = load_run(out / "lora").cfg
    tokenizer = AutoTokenizer.from_pretrained(out / "lora" / "tokenizer")
    samples = prepare(cfg.data, tokenizer).splits["validation"][: cfg.train.max_eval_samples]
    untouched = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"])
    ref = loss_on_samples(untouched, samples, tokenizer.pad_token_id, cfg.eval.batch_size, torch.device("cpu"))
    assert base["val_loss"] == pytest.approx(ref["loss"], rel=1e-6)
    # ia3 failed first, so lora (the first success) also evaluated the base model
    lora_test = read(out / "lora" / "eval_test.json")
    assert base["test_loss"] == lora_test["base"]["loss"] and base["samples"] == lora_test["base"]["sampled"]["samples"]
    assert "base" not in read(out / "prompt" / "eval_test.json")
    assert [s["prompt"] for s in base["samples"]] == [s["prompt"] for s in rows(compared["results"])["prompt"]["samples"]]


def test_failed_method_is_reported_and_the_others_finish(compared):
    by_method = rows(compared["results"])
    assert by_method["ia3"]["status"] == "failed" and "nope" in by_method["ia3"]["error"]
    assert by_method["lora"]["status"] == by_method["prompt"]["status"] == "done"
    table = (compared["out"] / "results.md").read_text()
    assert "nope" in table and table.count("\n") == 2 + 4  # header, rule, base + 3 methods


def test_html_embeds_the_plots_and_the_generations(compared):
    import html

    page = (compared["out"] / "report.html").read_text()
    assert page.count('<img alt="') == 3 and page.count('src="data:image/png;base64,') == 3
    for r in [compared["results"]["base"], *rows(compared["results"]).values()]:
        for sample in r.get("samples", []):
            assert html.escape(sample["answer"]) in page and html.escape(sample["prompt"]) in page
    assert "nope" in page and "<table" in page


def test_rerun_skips_finished_methods(compared, capsys):
    out = compared["out"]
    stamps = {p: p.stat().st_mtime_ns for m in ("lora", "prompt") for p in (out / m).glob("*.json")}
    # ia3 would be retried (a failure is never "finished"); leave it out to keep the test fast
    args = [("lora,prompt" if a == "ia3,lora,prompt" else a) for a in compared["args"]]
    assert main(args) == 0
    assert "lora: finished earlier, skipped" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = rows(read(out / "results.json"))
    assert again["lora"]["reused"] and again["prompt"]["reused"] and "ia3" not in again
    assert again["lora"]["val_loss"] == rows(compared["results"])["lora"]["val_loss"]


@pytest.mark.parametrize("extra, message", [
    (["--methods", "lroa"], "did you mean 'lora'"),
    (["--max-tokens", "100"], "not both"),
    (["--set", "compare.per_method.lora.seed=3"], "must be the same for every method"),
    (["--set", "method.lora.rr=2"], "did you mean 'r'"),
    (["--lr", "5e-3"], "other settings"),
])
def test_user_mistakes_exit_2_with_one_line(compared, extra, message, capsys):
    assert main([*compared["args"], *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_refuses_a_directory_that_is_not_a_comparison(tiny_dirs, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(compare_args(tiny_dirs["gpt2"], tmp_path, "lora")) == 2
    assert "not a chattune compare directory" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_mid_training_resumes_from_the_checkpoint(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    args = compare_args(tiny_dirs["gpt2"], out, "lora", "--max-steps", "12", "--set", "train.save_every=1",
                        "--set", "train.log_every=1")
    proc = subprocess.Popen([sys.executable, "-m", "chattune.cli", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, deadline = out / "lora" / "checkpoint" / "state.json", time.time() + 300
    while time.time() < deadline and not (state.is_file() and read(state)["step"] >= 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker, as a closed terminal would
    proc.wait()
    assert not (out / "lora" / "summary.json").exists(), "finished before it could be killed"
    before = (out / "lora" / "metrics.jsonl").read_text()
    assert main(args) == 0
    # continued, not restarted: the killed attempt's lines (with their own timings) are still there
    assert before and (out / "lora" / "metrics.jsonl").read_text().startswith(before)
    assert read(out / "lora" / "summary.json")["steps"] == 12
    assert read(out / "results.json")["methods"][0]["status"] == "done"


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package")
def test_report_renders_in_headless_chromium(compared, tmp_path):
    shot = tmp_path / "report.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
           (compared["out"] / "report.html").resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.is_file()
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    colours = image.getcolors(maxcolors=1 << 20) or []
    # a page of text alone has a few grey levels; the plots add many colours
    assert len(colours) > 500, len(colours)
