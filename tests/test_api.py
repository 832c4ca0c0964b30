"""The Python API (chattune.api) against the CLI it sits under: the same run, the same
answers one at a time and in a batch, the same error messages, the same tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import chattune
from chattune.cli import main
from chattune.engine import GREEDY
from chattune.generate.loaded import LoadedRun
from chattune.methods import all_methods
from chattune.training.settings import RunConfig
from test_engine import tuned
from tiny import make_tokenizer, tiny_dirs  # noqa: F401  (fixture)

QUESTIONS = ["What's the capital of Italy?", "Why is the sky blue?", "Hi",
             "Write a haiku about the sea and the wind over the long grey water."]


def test_import_is_light_and_lists_the_api():
    code = ("import sys, chattune; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "print(sorted(chattune.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("train", "load", "evaluate", "export", "compare", "data", "Run", "Chatbot", "EvalResult",
                 "SamplingParams", "DEFAULTS", "UserError"):
        assert f"'{name}'" in out, name
    assert all(getattr(chattune, name) is not None for name in chattune.__all__)


def test_evaluate_and_compare_stay_functions_beside_their_subpackages():
    import chattune.compare.report  # noqa: F401  (first import of a subpackage must not replace the function)
    import chattune.evaluate.report as report

    assert callable(chattune.evaluate) and callable(chattune.compare)
    assert chattune.evaluate.report is report and chattune.evaluate.evaluate_run is not None
    assert "Evaluate a run" in chattune.evaluate.__doc__


def cli_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line.removeprefix("chattune: error: ")


@pytest.mark.parametrize("call, argv", [
    (lambda m: chattune.train(model=m, overrides=["train.lrr=1"]), ["train", "--set", "train.lrr=1"]),
    (lambda m: chattune.train(model=m, method="lroa"), ["train", "--method", "lroa"]),
    (lambda m: chattune.train(model=m, resume="/tmp", config="x.yaml"), ["train", "--resume", "/tmp", "--config", "x.yaml"]),
    (lambda m: chattune.evaluate("/tmp"), ["eval", "/tmp"]),
    (lambda m: chattune.load("/tmp"), ["chat", "/tmp"]),
])
def test_a_user_mistake_raises_the_cli_message(call, argv, tiny_dirs, capsys):
    model = str(tiny_dirs["gpt2"])
    if argv[0] == "train":
        argv = [*argv, "--model", model]
    with pytest.raises(chattune.UserError) as caught:
        call(model)
    assert str(caught.value) == cli_error(argv, capsys)


def test_unknown_settings_name_the_closest():
    with pytest.raises(chattune.UserError, match="did you mean 'max_steps'"):
        chattune.train(max_step=3)
    with pytest.raises(chattune.UserError, match="unknown sampling setting 'temp'"):
        chattune.Chatbot(None).chat("hi", temp=0.5)


def losses(run_dir: Path) -> list[float]:
    return chattune.Run(run_dir).losses


def test_api_and_cli_give_the_same_run(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_dirs["llama"]), "--dataset", "sample", "--output-dir", str(out),
                 "--max-length", "256", "--max-steps", "4", "--lr", "1e-2", "--batch-size", "4",
                 "--set", "train.log_every=1", "--set", "train.warmup_ratio=0"]) == 0
    cli_run = out.rename(tmp_path / "cli")
    run = chattune.train(model=str(tiny_dirs["llama"]), dataset="sample", output_dir=str(out), max_length=256,
                         max_steps=4, lr=1e-2, train={"batch_size": 4, "log_every": 1}, overrides=["train.warmup_ratio=0"])
    assert (out / "config.yaml").read_text() == (cli_run / "config.yaml").read_text()
    assert len(run.losses) == 4 and run.losses == losses(cli_run)  # to the last digit
    assert run.summary["steps"] == 4 and run.config.train.max_steps == 4


def loaded(method: str, arch: str) -> LoadedRun:
    """A method on a tiny model, moved off its identity (test_engine.tuned), as a loaded run."""
    tokenizer = make_tokenizer()
    m, model, _ = tuned(method, arch, tokenizer)
    cfg = RunConfig()
    cfg.method.name = method
    return LoadedRun(cfg, model, tokenizer, m, None)


@pytest.mark.parametrize("method", sorted(all_methods()))
def test_generate_on_a_batch_equals_chat_one_at_a_time(method):
    run = loaded(method, "llama" if method in ("prefix", "ia3") else "gpt2")
    bots = [chattune.Chatbot(run)] + ([chattune.Chatbot(run, base=True)] if run.method.disable else [])
    texts = []
    for bot in bots:
        batch = bot.generate(QUESTIONS, GREEDY, max_new_tokens=8, max_batch=2)  # rows come and go
        one = [bot.chat(q, sampling=GREEDY, max_new_tokens=8) for q in QUESTIONS]
        assert [a.text for a in batch] == one
        assert all(a.tokens == len(a.token_ids) > 0 and a.finish_reason in ("eos", "stop", "length") for a in batch)
        assert "".join(bot.stream(QUESTIONS[1], sampling=GREEDY, max_new_tokens=8)) == one[1]
        texts.append(one)
    if len(texts) == 2:  # the base answers really are another model's
        assert texts[0] != texts[1]


@pytest.fixture(scope="module")
def api_run(tiny_dirs, tmp_path_factory) -> chattune.Run:
    out = tmp_path_factory.mktemp("api") / "run"
    return chattune.train(model=str(tiny_dirs["gpt2"]), max_steps=3, output_dir=str(out), max_length=128,
                          lr=1e-2)


def test_evaluate_gives_the_cli_table_and_a_dataframe(api_run, capsys, monkeypatch):
    argv = ["eval", str(api_run.dir), "--num-prompts", "2", "--max-new-tokens", "8", "--decodings", "greedy"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = chattune.evaluate(api_run, num_prompts=2, max_new_tokens=8, decodings=["greedy"])
    assert printed == f"{result.table()}\nanswers and result.json: {result.output_dir}\n"
    assert result.output_dir == api_run.dir / "eval-test" and (result.output_dir / "result.json").is_file()
    frame = result.to_dataframe()
    assert list(frame["model"]) == ["tuned", "base"] and list(frame["decoding"]) == ["greedy", "greedy"]
    assert frame["answers"].tolist() == [2, 2] and len(result.to_dataframe(answers=True)) == 4
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(chattune.UserError, match="pip install 'chattune\\[pandas\\]'"):
        result.to_dataframe()


def test_a_loaded_chatbot_is_evaluated_without_reloading(api_run, monkeypatch):
    bot = api_run.load()
    import chattune.generate.loaded as loaded_module

    monkeypatch.setattr(loaded_module, "load_run", lambda *a: pytest.fail("reloaded"))
    result = chattune.evaluate(bot, num_prompts=1, max_new_tokens=4, decodings="greedy", base=False)
    assert "base" not in result.data and result.data["tuned"]["greedy"]["answers"] == 1


def test_a_plain_model_loads_and_answers(tiny_dirs):
    bot = chattune.load(tiny_dirs["gpt2"])
    assert bot.run_dir is None
    answers = bot.generate(QUESTIONS[:2], GREEDY, max_new_tokens=6)
    assert [a.text for a in answers] == [bot.chat(q, sampling=GREEDY, max_new_tokens=6) for q in QUESTIONS[:2]]
    with pytest.raises(chattune.UserError, match="needs a trained run"):
        chattune.evaluate(bot)


def test_export_and_data_load_print_what_the_cli_prints(api_run, tiny_dirs, tmp_path, capsys):
    exported = chattune.export(api_run, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file() and "merged into the weights" in str(exported)
    with pytest.raises(chattune.UserError, match="apply to --format gguf"):
        chattune.export(api_run, tmp_path / "other", quant="q8_0")
    selection = chattune.data.load("sample", tokenizer=str(tiny_dirs["gpt2"]), max_length=128)
    assert main(["data", "--tokenizer", str(tiny_dirs["gpt2"]), "--max-length", "128"]) == 0
    assert capsys.readouterr().out == f"{selection}\n"
    shown = selection.samples(2)
    assert len(shown) == 2 and all("⟦" in s["text"] for s in shown)
    with pytest.raises(chattune.UserError, match="unknown config key 'data.max_lenght'"):
        chattune.data.load(max_lenght=5)


def test_the_six_line_pipeline_of_the_docs_runs(tiny_dirs, tmp_path, monkeypatch, capsys):
    """docs/python.md's pipeline block, on a tiny model with small budgets."""
    import re

    page = (Path(__file__).parents[1] / "docs" / "python.md").read_text()
    block = page.split("<!-- python: the pipeline", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = (block.replace('"smollm2-135m"', repr(str(tiny_dirs["llama"])))
            .replace("max_steps=200", "max_steps=2, max_length=256")
            .replace("num_prompts=20", "num_prompts=1, max_new_tokens=4"))
    code = re.sub(r"\.chat\((.*)\)\)", r".chat(\1, max_new_tokens=4))", code)
    assert code.count("max_new_tokens=4") == 2
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/python.md", "exec"), {})
    out = capsys.readouterr().out
    assert "rows" in out and "reference-answer loss" in out and "merged into the weights" in out
    assert (tmp_path / "runs" / "lora" / "adapter").is_dir() and (tmp_path / "exported" / "lora").is_dir()
