"""Training loop, checkpoints, resume, multi-process and eval, on tiny models via the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chattune.cli import main
from tiny import kill_after_checkpoint, tiny_dirs  # noqa: F401  (fixture)

ROOT = Path(__file__).parents[1]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--dataset", "sample", "--output-dir", str(out), "--max-length", "256",
            "--set", "train.log_every=1", "--set", "train.warmup_ratio=0", *extra]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_loss_falls_over_30_steps(tiny_dirs, tmp_path, arch):
    out = tmp_path / "run"
    assert main(train_args(tiny_dirs[arch], out, "--max-steps", "30", "--lr", "1e-2", "--batch-size", "4")) == 0
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    for name in ("config.yaml", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "tokenizer/tokenizer_config.json", "checkpoint/state.json", "checkpoint/optimizer.safetensors",
                 "summary.json", "run_info.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "run_info.json").read_text())
    assert info["trainable_params"] > 0 and 0 < info["trainable_share"] < 0.5


def test_saved_adapter_loads_with_plain_peft_and_gives_identical_logits(tiny_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chattune.generate.loaded import load_run

    out = tmp_path / "run"
    assert main(train_args(tiny_dirs["gpt2"], out, "--max-steps", "3", "--lr", "1e-2")) == 0
    run = load_run(out)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]), out / "adapter").eval()
    x = torch.randint(1, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(run.model(input_ids=x).logits, plain(input_ids=x).logits)
        with run.base() as base:
            untouched = AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]).eval()
            assert torch.equal(base(input_ids=x).logits, untouched(input_ids=x).logits)
        assert not torch.equal(run.model(input_ids=x).logits, untouched(input_ids=x).logits)


def test_packing_on_and_off_give_the_same_loss(tiny_dirs, tmp_path):
    losses = {}
    for packing in ("--packing", "--no-packing"):
        out = tmp_path / packing
        # one step over the whole training split: same data, same weights, different batching
        assert main(train_args(tiny_dirs["llama"], out, "--max-steps", "1", "--batch-size", "512", packing,
                               "--precision", "fp32")) == 0
        losses[packing] = metrics(out)[0]["loss"]
    assert losses["--packing"] == pytest.approx(losses["--no-packing"], rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_selected_logits_give_the_loss_of_full_logits(tiny_dirs, tmp_path, method):
    """The LM head projected only at loss positions gives the HF-style full-logits loss
    (prompt tuning: its virtual tokens shift the positions)."""
    losses = {}
    for mode in ("selected", "full"):
        out = tmp_path / mode
        assert main(train_args(tiny_dirs["gpt2"], out, "--method", method, "--max-steps", "2", "--batch-size", "4",
                               "--precision", "fp32", "--set", f"train.loss_logits={mode}")) == 0
        losses[mode] = [m["loss"] for m in metrics(out) if "loss" in m]
    assert losses["selected"] == pytest.approx(losses["full"], rel=1e-5)


def _cli(*args: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chattune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_killed_and_resumed_equals_uninterrupted(tiny_dirs, tmp_path):
    common = ["--max-steps", "24", "--lr", "3e-3", "--batch-size", "2", "--set", "train.save_every=2"]
    straight = tmp_path / "straight"
    assert main(train_args(tiny_dirs["gpt2"], straight, *common)) == 0

    killed = tmp_path / "killed"
    proc = _cli(*train_args(tiny_dirs["gpt2"], killed, *common))
    kill_after_checkpoint(proc, killed, 4, 20)  # as soon as a mid-run checkpoint exists
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    assert main(["train", "--resume", str(killed)]) == 0
    a, b = metrics(straight), metrics(killed)
    assert [m["step"] for m in b] == [m["step"] for m in a]  # steps redone after the kill are logged once
    assert [m["loss"] for m in b if "loss" in m][-5:] == pytest.approx([m["loss"] for m in a if "loss" in m][-5:], rel=1e-6)
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=1e-6)


def test_two_processes_equal_one_with_double_accumulation(tiny_dirs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # dropout off: its random masks cannot match across process layouts
    common = ["--max-steps", "3", "--lr", "1e-2", "--batch-size", "2", "--precision", "fp32", "--no-packing",
              "--set", "method.lora.dropout=0"]
    assert main(train_args(tiny_dirs["llama"], one, *common, "--grad-accum", "4")) == 0
    # `--multi_gpu` is accelerate's multi-process launcher (torchrun); without a GPU the
    # processes run on the CPU with the gloo backend. `--cpu` would start a single process.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "chattune.cli",
           *train_args(tiny_dirs["llama"], two, *common, "--grad-accum", "2")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    la = [m["loss"] for m in metrics(one) if "loss" in m]
    lb = [m["loss"] for m in metrics(two) if "loss" in m]
    assert la == pytest.approx(lb, rel=1e-4)
    from safetensors.torch import load_file

    wa, wb = load_file(one / "adapter/adapter_model.safetensors"), load_file(two / "adapter/adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)  # Adam amplifies reduction-order noise


def test_nan_loss_stops_with_one_line_and_keeps_checkpoint(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(train_args(tiny_dirs["gpt2"], out, "--max-steps", "30", "--lr", "1e30", "--set", "train.save_every=1",
                           "--set", "train.max_grad_norm=0", "--precision", "fp32"))
    errors = [e for e in capsys.readouterr().err.splitlines() if e.startswith("chattune: error")]
    assert code == 2
    assert len(errors) == 1 and "loss became" in errors[0]
    assert (out / "checkpoint" / "state.json").is_file()


def test_eval_base_numbers_equal_untouched_base(tiny_dirs, tmp_path, capsys):
    from chattune.data import prepare
    from chattune.training.passes import loss_on_samples
    from chattune.generate.loaded import load_run
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(train_args(tiny_dirs["llama"], out, "--max-steps", "5", "--lr", "1e-2")) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--num-generate", "2", "--max-new-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    run = load_run(out)
    samples = prepare(run.cfg.data, run.tokenizer).splits["test"]
    untouched = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    from chattune.models.loading import autocast_dtype

    cpu = torch.device("cpu")
    ref = loss_on_samples(untouched, samples, run.tokenizer.pad_token_id, 8, cpu, autocast_dtype("auto", cpu))
    assert result["base"]["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert result["base"]["all_loss"] == pytest.approx(ref["all_loss"], rel=1e-6)
    assert result["tuned"]["loss"] != pytest.approx(ref["loss"], rel=1e-6)
    for model in ("tuned", "base"):
        assert "ppl" in result[model] and "all_ppl" in result[model]
        for decoding in ("sampled", "greedy"):
            cell = result[model][decoding]
            for key in ("eos_share", "new_turn_share", "rep4", "loop_share", "distinct_2", "median_length", "rouge_l"):
                assert key in cell, (model, decoding, key)
            assert cell["answers"] == 2


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "no-such-org/no-such-model", "--max-steps", "1"], "cannot load model"),
    (["train", "--dataset", "/nonexistent/file.jsonl", "--max-steps", "1"], "no such file"),
    (["train", "--set", "train.lrr=1"], "did you mean 'lr'"),
    (["train", "--method", "prompt", "--packing", "--max-steps", "1", "--max-length", "128"], "packing"),
    (["eval", "/tmp"], "not a finished chattune run"),
    (["train", "--method", "lroa"], "did you mean 'lora'"),
    (["train", "--method", "prompt", "--max-length", "512", "--max-steps", "1"], "exceeds the model's 512 positions"),
])
def test_user_mistakes_get_one_line_and_exit_2(argv, message, capsys, tiny_dirs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if "--model" not in argv and argv[0] == "train":
        argv = [*argv, "--model", str(tiny_dirs["gpt2"])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_gguf_of_unsupported_architecture(tmp_path, capsys):
    import gguf

    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tensor("x", torch.zeros(4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["methods", "--model", str(path)]) == 2
    assert "not supported" in capsys.readouterr().err


def test_early_stopping_stops_when_validation_stops_improving(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    # a learning rate too small to move the validation loss: the second evaluation is no better
    assert main(train_args(tiny_dirs["gpt2"], out, "--max-steps", "20", "--lr", "1e-12", "--set", "train.eval_every=1",
                           "--set", "train.early_stopping_patience=1", "--precision", "fp32")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 2
