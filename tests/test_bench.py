"""The throughput harness end to end on a tiny GPT-2: its output format, never its timings
(benchmarks measure, tests assert)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
import torch

from tiny import SAMPLE, save_tiny

ROOT = Path(__file__).parents[1]
SYSTEMS = {"seed", "trl", "chattune"}


def write_conversations(path: Path) -> Path:
    """conversation_a of each built-in arena row, in messages format: the harness's input."""
    with path.open("w", encoding="utf-8") as f:
        for line in SAMPLE.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            f.write(json.dumps({"id": row["question_id"], "messages": row["conversation_a"]}) + "\n")
    return path


def test_quick_bench_prints_the_table_and_one_json_line(tmp_path):
    model = save_tiny(tmp_path / "tiny-gpt2", "gpt2")
    data = write_conversations(tmp_path / "conversations.jsonl")
    cmd = [sys.executable, "benchmarks/throughput.py", "--model-dir", str(model), "--data", str(data), "--quick",
           "--steps", "2", "--val", "2", "--gen-tokens", "2", "--seeds", "2", "--work-dir", str(tmp_path / "work")]
    # one thread: a tiny model gains nothing from two, and on a shared CPU it waits less
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    header = next(line for line in lines if line.startswith("system "))
    for column in ("precision", "tokens/s", "loss-tok/s", "s/epoch", "peak RSS MB", "val loss", "% peak"):
        assert column in header
    assert {line.split()[0] for line in lines if line.split()[:1] and line.split()[0] in SYSTEMS} == SYSTEMS

    result = json.loads(lines[-1])
    for key in ("vs_seed", "vs_trl"):
        assert math.isfinite(result[key]) and result[key] > 0
    for key in ("peak_rss_mb", "val_loss"):
        assert set(result[key]) == SYSTEMS
        assert all(math.isfinite(v) and v > 0 for v in result[key].values())
    assert result["steps"] == 2 and result["seeds"] == 2 and result["model"] == "tiny-gpt2"
    figures = result["models"]["tiny-gpt2"]
    # TRL and chattune trained once per seed, the seed recipe once; val_loss is their mean
    assert [len(figures["val_losses"][k]) for k in ("seed", "trl", "chattune")] == [1, 2, 2]
    assert figures["val_losses"]["chattune"][0] != figures["val_losses"]["chattune"][1]
    assert math.isclose(result["val_loss"]["trl"], sum(figures["val_losses"]["trl"]) / 2)
    assert math.isfinite(figures["val_gap_chattune_trl"]["standard_error"])
    assert any(line.startswith("val loss over training seeds 0..1") for line in lines)
    # bf16 for TRL and chattune where the CPU has bf16 instructions (precision auto), else fp32
    native = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert figures["precision"] == {"seed": "fp32", "trl": native, "chattune": native}
    # every system trained on the same 8 conversations; the seed's texts carry no EOS
    assert figures["tokens"]["seed"] == figures["tokens"]["chattune"] - 8
    # chattune's own decoding loop keeps the KV cache for every method, prefix tuning included
    generation = figures["generation"]
    assert generation["prefix"]["kv_cache"] and generation["plain_generate"]["kv_cache"]
    assert all(generation[m]["kv_cache"] for m in generation)


def test_no_benchmark_script_shadows_a_module_a_library_imports():
    """A script run as ``python benchmarks/x.py`` puts benchmarks/ first on sys.path, so a file there
    named like a package transformers probes for (``kernels.py`` was one) is imported in its place."""
    import importlib.util
    import re
    import transformers.utils.import_utils as probes
    probed = set(re.findall(r'_is_package_available\(\s*"([A-Za-z0-9_]+)"', Path(probes.__file__).read_text()))
    assert "kernels" in probed and "peft" in probed  # the pattern still finds transformers' probes
    here = Path(__file__).resolve().parents[1] / "benchmarks"
    names = {p.stem for p in here.glob("*.py")}
    installed = {n for n in names if importlib.util.find_spec(n) is not None
                 and Path(importlib.util.find_spec(n).origin or "").parent != here}
    assert not names & probed and not installed, sorted(names & probed | installed)
