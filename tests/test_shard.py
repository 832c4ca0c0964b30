"""Sharded training (train.shard=fsdp): 2 CPU processes (gloo) under `accelerate launch` with the
shipped FSDP config, against the 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune.cli import main
from tiny import tiny_dirs  # noqa: F401  (fixture)

ROOT = Path(__file__).parents[1]
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
WEIGHTS = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


@pytest.fixture(scope="module")
def models(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """The tiny models, GPT-2 with its dropout off: random masks cannot match across process layouts."""
    gpt2 = tmp_path_factory.mktemp("gpt2-no-dropout")
    for f in tiny_dirs["gpt2"].iterdir():
        shutil.copy(f, gpt2 / f.name)
    cfg = json.loads((gpt2 / "config.json").read_text())
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (gpt2 / "config.json").write_text(json.dumps(cfg))
    return {"llama": tiny_dirs["llama"], "gpt2": gpt2}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in metrics(run) if "loss" in m]


def train_args(model: Path, out: Path, method: str, *extra: str) -> list[str]:
    # dropout off: its random masks cannot match across process layouts
    drop = ["--set", "method.lora.dropout=0"] if method == "lora" else []
    # full: AdamW moves every weight by ~lr whatever its gradient, so reduction-order noise in a
    # near-zero gradient shows at the scale of lr; 1e-3 keeps it inside the tolerance below
    lr = "1e-3" if method == "full" else "1e-2"
    return ["train", "--model", str(model), "--dataset", "sample", "--output-dir", str(out), "--max-length", "256",
            "--method", method, "--lr", lr, "--batch-size", "2", "--precision", "fp32", "--no-packing",
            "--set", "train.log_every=1", "--set", "train.warmup_ratio=0", *drop, *extra]


def launch(*args: str) -> list[str]:
    """`accelerate launch` with the shipped FSDP config: 2 processes, on the CPU with gloo here."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
            "-m", "chattune.cli", *args, "--set", "train.shard=fsdp"]


def run_sharded(*args: str) -> None:
    res = subprocess.run(launch(*args), capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]


def assert_same_weights(a: Path, b: Path, name: str) -> None:
    wa, wb = load_file(a / "adapter" / name), load_file(b / "adapter" / name)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)  # Adam amplifies reduction-order noise


@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("gpt2", "full")])
def test_two_sharded_processes_equal_one(models, tmp_path, arch, method):
    one, two = tmp_path / "one", tmp_path / "two"
    steps = ["--max-steps", "3"]
    assert main(train_args(models[arch], one, method, *steps, "--grad-accum", "4")) == 0
    run_sharded(*train_args(models[arch], two, method, *steps, "--grad-accum", "2"))

    info = json.loads((two / "run_info.json").read_text())
    held, total = info["params_per_process"], info["total_params"]
    assert info["shard"] == "fsdp" and len(held) == 2
    assert sum(held) == total and max(held) <= total // 2 + 64  # each rank its shard (dim-0 chunks), not the model
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert metrics(two)[-1]["val_loss"] == pytest.approx(metrics(one)[-1]["val_loss"], rel=1e-4)
    assert_same_weights(one, two, WEIGHTS[method])
    # the same checkpoint format: full AdamW moments, as the 1-process run writes them
    oa, ob = load_file(one / "checkpoint/optimizer.safetensors"), load_file(two / "checkpoint/optimizer.safetensors")
    assert {k: v.shape for k, v in oa.items()} == {k: v.shape for k, v in ob.items()}

    from chattune.generate.loaded import load_run  # what eval/chat/serve/export read

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        la, lb = (load_run(r).model(input_ids=ids).logits for r in (one, two))
    torch.testing.assert_close(la, lb, rtol=1e-3, atol=1e-3)


def test_sharded_run_killed_and_resumed_equals_uninterrupted(models, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--max-steps", "12", "--set", "train.save_every=2"]
    run_sharded(*train_args(models["gpt2"], straight, "full", *args))

    # its own session, so the SIGKILL reaches the launcher and both workers at once
    proc = subprocess.Popen(launch(*train_args(models["gpt2"], killed, "full", *args)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state, deadline = killed / "checkpoint" / "state.json", time.time() + 240
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["step"] >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"

    run_sharded("train", "--resume", str(killed))
    a, b = metrics(straight), metrics(killed)
    assert [m["step"] for m in b] == [m["step"] for m in a]
    assert losses(killed) == pytest.approx(losses(straight), rel=1e-5)  # AdamW moments restored shard by shard
    assert_same_weights(straight, killed, WEIGHTS["full"])


def test_sharding_needs_several_processes_and_a_shardable_method(tiny_dirs, tmp_path, capsys):
    base = ["--max-steps", "1", "--set", "train.shard=fsdp"]
    assert main(train_args(tiny_dirs["llama"], tmp_path / "a", "lora", *base)) == 2
    assert "train.shard=fsdp shards over processes" in capsys.readouterr().err
    assert main(train_args(tiny_dirs["llama"], tmp_path / "b", "lora", *base, "--set", "train.compile=true")) == 2
    assert "train.compile is not supported with train.shard=fsdp" in capsys.readouterr().err
    assert main(train_args(tiny_dirs["llama"], tmp_path / "c", "prompt", *base)) == 2
    assert "does not support method 'prompt'" in capsys.readouterr().err


def test_accelerate_fsdp_settings_reach_fully_shard():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    from chattune.training.shard import options

    for name, offload in (("fsdp.yaml", False), ("fsdp-offload.yaml", True)):
        cfg = load_config_from_file(str(FSDP_CONFIG.parent / name)).fsdp_config
        plugin = FullyShardedDataParallelPlugin(fsdp_version=cfg["fsdp_version"], cpu_offload=cfg["fsdp_offload_params"],
                                                reshard_after_forward=cfg["fsdp_reshard_after_forward"])
        kw = options(plugin)
        assert kw["reshard_after_forward"] is True
        assert isinstance(kw["offload_policy"], CPUOffloadPolicy) == offload
    assert options(None) == {}


def test_sharded_dpo_equals_one_process(models, tmp_path):
    """The reference pass runs sharded too (every process takes part in each forward)."""
    one, two = tmp_path / "one", tmp_path / "two"
    dpo = ["--objective", "dpo", "--max-steps", "3", "--max-length", "128", "--set", "data.max_rows=16"]
    assert main(train_args(models["llama"], one, "lora", *dpo, "--grad-accum", "2")) == 0
    run_sharded(*train_args(models["llama"], two, "lora", *dpo))
    assert losses(two)[0] == pytest.approx(0.6931472, abs=1e-5)  # ln 2: the policy starts as its reference
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert_same_weights(one, two, WEIGHTS["lora"])
