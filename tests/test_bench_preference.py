"""The preference harness end to end on a tiny Llama: its output format and step-0 agreement
with TRL, never its timings (benchmarks measure, tests assert)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import save_tiny

ROOT = Path(__file__).parents[1]


def _quick_bench(tmp_path, shared_data, *extra: str) -> dict:
    model = save_tiny(tmp_path / "tiny-llama", "llama")
    cmd = [sys.executable, "benchmarks/preference.py", "--model", str(model), "--quick",
           "--data", str(shared_data / "arena_hard_v0.1.jsonl"), "--work-dir", str(tmp_path / "work"), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_quick_preference_bench_prints_one_json_line(tmp_path, shared_data):
    result = _quick_bench(tmp_path, shared_data)
    assert result["vs_trl"] > 0 and set(result["peak_rss_mb"]) == {"chattune", "packed", "trl"}
    for system, loss in result["step0_loss"].items():  # the same pairs and reference: ln 2 for both systems
        assert loss == pytest.approx(math.log(2), abs=1e-4), system


@pytest.mark.slow
def test_quick_kto_bench_against_trl_kto(tmp_path, shared_data):
    result = _quick_bench(tmp_path, shared_data, "--objective", "kto")
    assert result["vs_trl_kto"] > 0 and result["rss_vs_trl_kto"] > 0 and "vs_trl" not in result
    assert result["rows_per_step"] == 4 and set(result["peak_rss_mb"]) == {"chattune", "packed", "trl"}
    # the same answers, reference and (zero) z0 at step 0: every answer costs 1/2 in both systems
    for system, loss in result["step0_loss"].items():
        assert loss == pytest.approx(0.5, abs=1e-4), system
    rows = [json.loads(x) for x in (tmp_path / "work" / "rows.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows[:4]] == [True, True, False, False]  # a step: 2 chosen, then their 2 rejected
    assert rows[0]["prompt"] == rows[2]["prompt"] and rows[0]["prompt"] != rows[1]["prompt"]
