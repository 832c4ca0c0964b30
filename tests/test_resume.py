"""Resume through the real CLI: budget extensions re-plan the schedule, other changes are
refused, bad checkpoints fall back to the previous one, and a full disk is one line."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chattune.cli import main
from tiny import tiny_dirs  # noqa: F401  (fixture)

LR = 3e-3


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--dataset", "sample", "--output-dir", str(out), "--max-length", "256",
            "--batch-size", "2", "--lr", str(LR), "--precision", "fp32", "--set", "train.log_every=1",
            "--set", "train.warmup_ratio=0", "--set", "train.save_every=1", "--set", "train.max_eval_samples=4",
            *extra]


@pytest.fixture(scope="module")
def finished(tiny_dirs, tmp_path_factory) -> Path:
    """A finished 3-step run, checkpointed at every step; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_args(tiny_dirs["gpt2"], out, "--max-steps", "3")) == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("chattune: error")]


def test_resume_extends_the_budget_and_replans_the_schedule(run, capsys):
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "done: 5 steps, final train loss" in out and "n/a" not in out.split("best val")[0]
    records = [m for m in metrics(run) if "loss" in m]
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5]
    # the cosine schedule is planned for 5 steps now: the lr after step 4 is the 5-step plan's
    assert records[3]["lr"] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 4 / 5)), rel=1e-6)
    assert records[4]["lr"] == pytest.approx(0.0, abs=1e-12)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["final_train_loss"] == records[4]["loss"]
    assert "max_steps: 5" in (run / "config.yaml").read_text()


def test_resume_of_a_finished_run_gives_a_complete_summary(run, capsys):
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    last = [m for m in metrics(run) if "loss" in m][-1]["loss"]
    assert f"done: 3 steps, final train loss {last:.4f}, best val loss" in out
    assert json.loads((run / "summary.json").read_text())["final_train_loss"] == last


def test_resume_past_the_budget_finishes_at_once(run, capsys):
    assert main(["train", "--resume", str(run), "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "already at step 3, at or past its budget of 2 steps" in err
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3]


def test_resume_may_change_the_cadence(run):
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--set", "train.eval_every=1",
                 "--set", "train.log_every=2", "--set", "train.save_every=3"]) == 0
    assert [m["step"] for m in metrics(run) if "val_loss" in m] == [3, 4]


@pytest.mark.parametrize("flags, setting", [
    (["--lr", "0.5"], "train.lr"),
    (["--method", "ia3"], "method.name"),
    (["--dataset", "some/other-dataset"], "data.dataset"),
    (["--model", "smollm2-135m"], "model.name"),
    (["--batch-size", "3"], "train.batch_size"),
    (["--set", "method.lora.r=4"], "method.lora.r"),
    (["--set", "train.early_stopping_patience=2"], "train.early_stopping_patience"),
    (["--output-dir", "elsewhere"], "--output-dir"),
])
def test_resume_refuses_other_changes_naming_the_setting(run, capsys, flags, setting):
    before = (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (f"--resume cannot change {setting} " in err[0] or f"drop {setting}" in err[0]), err
    assert (run / "config.yaml").read_text() == before


def _garbage(path: Path) -> None:
    path.write_bytes(b"\xff" * 64)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _reshape(path: Path) -> None:
    save_file({k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.dim() else v for k, v in load_file(path).items()},
              path)


def _rename(path: Path) -> None:
    save_file({f"x.{k}": v for k, v in load_file(path).items()}, path)


@pytest.mark.parametrize("name, spoil", [
    ("trainable.safetensors", _garbage), ("trainable.safetensors", _truncate), ("trainable.safetensors", _reshape),
    ("trainable.safetensors", _rename), ("optimizer.safetensors", _reshape), ("optimizer.safetensors", _truncate),
    ("rng.safetensors", _garbage), ("state.json", _truncate),
])
def test_a_bad_checkpoint_falls_back_to_the_previous_one(run, capsys, name, spoil):
    spoil(run / "checkpoint" / name)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "4"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("chattune: warning")]
    assert len(err) == 2, err
    assert str(run / "checkpoint" / name) in err[0]
    assert "previous checkpoint" in err[1] and "(step 2)" in err[1]
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3, 4]  # step 3 redone, logged once
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 4
    assert (run / "checkpoint.bad").is_dir()


def test_no_good_checkpoint_ends_in_exit_2(run, capsys):
    _garbage(run / "checkpoint" / "trainable.safetensors")
    _truncate(run / "checkpoint-previous" / "optimizer.safetensors")
    assert main(["train", "--resume", str(run), "--max-steps", "4"]) == 2
    err = errors(capsys.readouterr().err)
    assert len(err) == 1 and str(run / "checkpoint-previous" / "optimizer.safetensors") in err[0]


def test_shapes_are_checked_before_the_optimiser_is_touched(tiny_dirs, tmp_path):
    from chattune.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from chattune.training.shard import trainable_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_constant_schedule

    def setup(r: int):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]), LoraConfig(r=r))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        return model, opt, get_constant_schedule(opt)

    model, opt, sched = setup(2)
    model(input_ids=torch.ones(1, 4, dtype=torch.long)).logits.sum().backward()
    opt.step()
    save_checkpoint(tmp_path, trainable_weights(model), opt.state_dict(), sched, {"step": 1})
    other, other_opt, other_sched = setup(4)
    before = {n: p.clone() for n, p in other.named_parameters() if p.requires_grad}
    with pytest.raises(CheckpointError, match="has shape"):
        load_checkpoint(tmp_path / "checkpoint", other, other_opt, other_sched)
    assert other_opt.state_dict()["state"] == {}
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters() if p.requires_grad)


def _fail_on_call(n: int, code: int):
    calls = {"n": 0}

    def fail(path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            raise OSError(code, "injected", str(path))
        return calls
    return fail, calls


@pytest.mark.parametrize("target, code, reason", [("checkpoint", errno.ENOSPC, "no space left on device"),
                                                  ("adapter", errno.EDQUOT, "disk quota exceeded"),
                                                  ("metrics", errno.EROFS, "read-only file system")])
def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tiny_dirs, tmp_path, capsys, monkeypatch,
                                                                 code, reason, target):
    import builtins

    from chattune.training import checkpoint
    from chattune.training import loop as train
    from chattune.methods import REGISTRY, get_method

    get_method("lora")  # fills the registry

    if target == "checkpoint":
        fail, _ = _fail_on_call(5, code)  # the first file of the second checkpoint (step 2)
        real = checkpoint.write_file
        monkeypatch.setattr(checkpoint, "write_file", lambda p, d: fail(p) and real(p, d))
    elif target == "adapter":
        fail, _ = _fail_on_call(2, code)  # the adapter of step 2
        lora = REGISTRY["lora"]
        monkeypatch.setitem(REGISTRY, "lora", dataclasses.replace(
            lora, save=lambda m, d, *state: fail(d / "adapter_model.safetensors") and lora.save(m, d, *state)))
    else:
        fail, _ = _fail_on_call(2, code)  # the metrics line of step 2

        def fake_open(path, mode="r", *a, **kw):
            if str(path).endswith("metrics.jsonl") and "a" in mode:
                fail(path)
            return builtins.open(path, mode, *a, **kw)
        monkeypatch.setattr(train, "open", fake_open, raising=False)
    out = tmp_path / "run"
    assert main(train_args(tiny_dirs["gpt2"], out, "--max-steps", "4")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("chattune:")]
    assert len(err) == 1 and reason in err[0] and "cannot write" in err[0], err
    assert str(out / target if target != "metrics" else out / "metrics.jsonl") in err[0]
    assert not (out / ".checkpoint-tmp").exists() and not (out / ".adapter-tmp").exists()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1
    monkeypatch.undo()
    assert main(["train", "--resume", str(out)]) == 0  # nothing lost beyond the last checkpoint
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3, 4]


def test_full_disk_while_starting_is_one_line(tiny_dirs, tmp_path, capsys, monkeypatch):
    from chattune.training import loop as train

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(train, "save_yaml", full)
    out = tmp_path / "run"
    assert main(train_args(tiny_dirs["gpt2"], out, "--max-steps", "1")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("chattune:")]
    assert err == [f"chattune: error: cannot write {out / 'config.yaml'}: no space left on device"]
