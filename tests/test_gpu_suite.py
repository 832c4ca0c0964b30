"""benchmarks/gpu_suite.sh --dry-run on the CPU: every part's flags exist in its script, the
results are one JSON line per part, and the eval part runs for real on a tiny shape."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def test_gpu_suite_dry_run_writes_a_line_per_part(tmp_path, shared_data):
    out = tmp_path / "suite.jsonl"
    res = subprocess.run([str(SUITE), "--dry-run", str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "CHATTUNE_DATA": str(shared_data)})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["part"] for r in rows] == ["device", "throughput", "methods", "decode", "dpo", "eval"]
    assert all(r["rc"] == 0 and r["result"] is not None for r in rows)
    assert rows[0]["result"]["cuda"] is False
    assert all(r["result"]["flags_checked"] > 3 for r in rows[1:5])
    assert rows[-1]["result"]["prompts"] == 2 and rows[-1]["result"]["eval"]["tuned"]["greedy"]["answers"] >= 1


def test_gpu_suite_refuses_without_a_gpu_and_a_renamed_flag_fails(tmp_path):
    res = subprocess.run([str(SUITE), str(tmp_path / "real.jsonl")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3 and "no CUDA device" in res.stderr
    check = subprocess.run(["bash", "-c", f'source <(sed -n "/^flags_exist()/,/^}}/p" {SUITE}); PY={ROOT}/.venv/bin/python; '
                            f'flags_exist benchmarks/methods_table.py --model x --no-such-flag 1'],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert check.returncode == 1 and "--no-such-flag" in check.stdout
