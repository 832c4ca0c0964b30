"""Signals, the run lock and SIGKILL at any point, on the real CLI in subprocesses."""

from __future__ import annotations

import json
import os
import re
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

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])}


def train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--dataset", "sample", "--output-dir", str(out), "--max-length", "128",
            "--batch-size", "2", "--lr", "3e-3", "--precision", "fp32", "--set", "train.log_every=1",
            "--set", "train.warmup_ratio=0", "--set", "train.max_eval_samples=4", *extra]


def cli(*args: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "chattune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, **env})


def steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"loss"' in line]


def wait_for_steps(proc: subprocess.Popen, run: Path, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(steps_logged(run)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_at_the_step_boundary(tiny_dirs, tmp_path, sig, code):
    run = tmp_path / "run"
    proc = cli(*train_args(tiny_dirs["gpt2"], run, "--max-steps", "500", "--set", "train.save_every=1000"))
    wait_for_steps(proc, run, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert f"interrupted at step {step}; continue with: chattune train --resume {run}" in err
    assert steps_logged(run)[-1] == step >= 2
    assert "Traceback" not in err


def test_second_ctrl_c_stops_at_once_and_keeps_the_checkpoint(tiny_dirs, tmp_path):
    run = tmp_path / "run"
    proc = cli(*train_args(tiny_dirs["gpt2"], run, "--max-steps", "500", "--set", "train.save_every=2"))
    deadline = time.time() + 300
    while not (run / "checkpoint" / "state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopping after this step" in err and "again" in err and "Traceback" not in err
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] >= 2
    for name in ("trainable", "optimizer", "rng"):
        load_file(run / "checkpoint" / f"{name}.safetensors")  # whole, not torn
    assert main(["train", "--resume", str(run), "--max-steps", str(state["step"] + 1)]) == 0


def test_a_second_process_on_a_live_run_is_refused_naming_its_pid(tiny_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    proc = cli(*train_args(tiny_dirs["gpt2"], run, "--max-steps", "500", "--set", "train.save_every=1"))
    try:
        wait_for_steps(proc, run, 1)
        for argv in (["train", "--resume", str(run)], train_args(tiny_dirs["gpt2"], run, "--max-steps", "2")):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"is in use by process {proc.pid}" in err[0], err
        assert proc.poll() is None  # the live run was left alone
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    assert proc.returncode == 130 and not (run / ".lock").exists()


def test_compare_respects_the_lock(tmp_path, capsys):
    out = tmp_path / "cmp"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from chattune.training.runguard import RunLock\n"
                               f"with RunLock(__import__('pathlib').Path({str(out)!r}), 'compare'):\n"
                               "    print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "compare.yaml").unlink(missing_ok=True)
        assert main(["compare", "--output-dir", str(out), "--methods", "lora", "--max-steps", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert f"in use by process {holder.pid}" in err[-1], err
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_dirs["gpt2"], run, "--max-steps", "1")) == 0
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (run / ".lock").write_text(f"{pid} 12345 train\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of {run} left by process {pid}, which is no longer running" in err
    assert not (run / ".lock").exists()


# -- kill anywhere -------------------------------------------------------------------------
def killed_run(args: list[str], run: Path, kill_points) -> list[str]:
    """Run ``args`` under tests/killpoints.py, SIGKILLed at each kill point in turn (each
    resumed process counts its own points), then resumed to the end. Returns where each
    kill landed (the kill point's description, traced by killpoints.py)."""
    kills: list[str] = []
    for k in [*kill_points, 0]:
        argv = args if not (run / "config.yaml").exists() else ["train", "--resume", str(run)]
        res = subprocess.run([sys.executable, str(TESTS / "killpoints.py"), *argv], capture_output=True, text=True,
                             env={**ENV, "CHATTUNE_KILL_AT": str(k), "CHATTUNE_KILL_TRACE": "1"}, timeout=600)
        if res.returncode == -signal.SIGKILL:
            kills.append(re.findall(r"kill point \d+: ([^\r\n]*)", res.stderr)[-1])  # lines may share a progress bar's
            continue
        assert res.returncode == 0, res.stderr[-3000:]
        assert "Traceback" not in res.stderr
        return kills
    raise AssertionError("unreachable")


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = (load_file(run / "checkpoint" / "trainable.safetensors") for run in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # float32 on CPU: bit for bit
    ma = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    drop = ("tokens_per_s", "step_seconds")
    assert [{k: v for k, v in m.items() if k not in drop} for m in ma] == \
        [{k: v for k, v in m.items() if k not in drop} for m in mb]  # each step once, same numbers


def kill_anywhere(tiny_dirs, tmp_path, steps: int, kill_points) -> list[str]:
    args = lambda out: train_args(tiny_dirs["llama"], out, "--max-steps", str(steps), "--set",  # noqa: E731
                                  "train.save_every=1", "--set", "train.eval_every=2")
    straight = tmp_path / "straight"
    assert killed_run(args(straight), straight, []) == []
    killed = tmp_path / "killed"
    kills = killed_run(args(killed), killed, kill_points)
    assert_same_run(straight, killed)
    return kills


def test_kill_anywhere_fast(tiny_dirs, tmp_path):
    # CHATTUNE_KILL_TRACE=1 lists the points: half of step 2's metrics line (checkpoint 1
    # kept); in the resumed process, between the two renames of checkpoint 2 (it is left in
    # .checkpoint-tmp); in the next, checkpoint 3's trainable.safetensors half written
    assert kill_anywhere(tiny_dirs, tmp_path, 3, [20, 21, 11]) == [
        "half a metrics line written", "renamed checkpoint to checkpoint-previous",
        ".checkpoint-tmp/trainable.safetensors half written"]


@pytest.mark.slow
def test_kill_anywhere(tiny_dirs, tmp_path):
    """Every process is killed one point later than the one before, until one finishes."""
    kills = kill_anywhere(tiny_dirs, tmp_path, 4, range(1, 400))
    assert len(kills) >= 20


def test_a_second_signal_after_the_run_stopped_exits_without_a_traceback():
    """The first Ctrl-C stopped the run and its block is left; a second one on the way out
    (a tiny model's step is shorter than a double press) ends the process with one line."""
    code = ("import os, signal, time\n"
            "from chattune.training.runguard import Interrupts\n"
            "with Interrupts() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(0.1)\n"
            "assert stop.signum == signal.SIGINT\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(5)\n"
            "print('not stopped')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert "SIGINT again: stopping now" in proc.stderr and "Traceback" not in proc.stderr
    assert "not stopped" not in proc.stdout
