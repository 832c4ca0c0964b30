"""examples/: the quick-start notebook runs end to end (nbclient) on a tiny model and is
committed without outputs; the two scripts run on a tiny model."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from tiny import tiny_dirs  # noqa: F401  (fixture)

EXAMPLES = Path(__file__).parents[1] / "examples"
NOTEBOOK = EXAMPLES / "quickstart.ipynb"


def test_the_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_the_notebook_runs_end_to_end_on_a_tiny_model(tiny_dirs, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = (f"MODEL = {str(tiny_dirs['llama'])!r}\nSTEPS = 3\nPROMPTS = 2\nMAX_NEW_TOKENS = 8\n"
                     f"OUTPUT = {str(tmp_path / 'run')!r}\n")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # a failing cell raises CellExecutionError
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "⟦" in text and "[tuned," in text and "reference-answer loss" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert (tmp_path / "run" / "adapter").is_dir() and (tmp_path / "run-hf" / "config.json").is_file()


def run_script(name: str, *argv: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_answer_prompts_writes_one_json_line_per_prompt(tiny_dirs, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What's the capital of Italy?\n\nWhy is the sky blue?\nHi\n")
    out = tmp_path / "answers.jsonl"
    run_script("answer_prompts.py", str(tiny_dirs["gpt2"]), str(prompts), str(out), "--greedy",
               "--max-new-tokens", "6", monkeypatch=monkeypatch)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["What's the capital of Italy?", "Why is the sky blue?", "Hi"]
    assert all(0 < r["tokens"] <= 6 and r["finish_reason"] in ("eos", "stop", "length") for r in rows)
    assert "3 answers" in capsys.readouterr().out


def test_sweep_trains_and_evaluates_each_setting(tiny_dirs, tmp_path, monkeypatch, capsys):
    run_script("sweep.py", "--model", str(tiny_dirs["gpt2"]), "--lrs", "1e-3", "1e-2", "--steps", "2",
               "--prompts", "1", "--max-new-tokens", "4", "--out", str(tmp_path / "sweep"), monkeypatch=monkeypatch)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].split()[0] == "0.001" and lines[-1].split()[0] == "0.01"
    assert (tmp_path / "sweep" / "lr-0.01" / "eval-test" / "result.json").is_file()
