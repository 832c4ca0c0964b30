"""Preference objectives: loss formulas, per-answer log-probs (packed, padded, virtual tokens),
the stored reference (step-0 loss ln 2 for every method x architecture), training, resume,
--init-from and eval, on tiny models through the real CLI."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from chattune.models import attention
from chattune.cli import main
from chattune.data import DataConfig, batch_plan
from chattune.data.pairs import prepare_pairs, split_pair
from chattune.methods import all_methods, get_method
from chattune.training.objectives import OBJECTIVES, collate_pairs
from chattune.training.passes import pair_logps
from conftest import build_model
from test_train import _cli, metrics
from tiny import kill_after_checkpoint, tiny_dirs  # noqa: F401  (fixture)

LN2 = math.log(2)
METHODS = ["lora", "dora", "ia3", "adapter", "prompt", "prefix", "full"]


def pref_args(model, out, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--dataset", "sample", "--output-dir", str(out), "--max-length", "128",
            "--batch-size", "2", "--precision", "fp32", "--set", "train.log_every=1", "--set", "train.warmup_ratio=0",
            "--set", "data.max_rows=16", *extra]


# -- formulas -----------------------------------------------------------------------------------
def test_loss_formulas_follow_the_papers():
    logps, ref, lengths = torch.tensor([[-10.0, -12.0]]), torch.tensor([[-11.0, -11.0]]), torch.tensor([[2.0, 4.0]])
    sp = F.softplus  # -log sigmoid(h) == softplus(-h)

    def loss(name, **kw):
        return float(OBJECTIVES[name](**kw).pair_losses(logps, ref, lengths)[0][0])

    h = 0.1 * ((-10 + 11) - (-12 + 11))  # DPO: beta * log-ratio difference = 0.2
    assert loss("dpo") == pytest.approx(float(sp(torch.tensor(-h))), rel=1e-6)
    robust = (0.9 * sp(torch.tensor(-h)) - 0.1 * sp(torch.tensor(h))) / 0.8  # Chowdhury et al. 2024, eq. 6
    assert loss("dpo", label_smoothing=0.1) == pytest.approx(float(robust), rel=1e-6)
    assert loss("ipo") == pytest.approx((1 / 2 - (-1 / 4) - 1 / (2 * 0.1)) ** 2, rel=1e-6)  # per-token log-ratios
    simpo = 2.0 * (-10 / 2) - 2.0 * (-12 / 4) - 1.0  # beta-scaled mean log-probs minus gamma
    assert loss("simpo") == pytest.approx(float(sp(torch.tensor(-simpo))), rel=1e-6)
    odds = [m - math.log(1 - math.exp(m)) for m in (-5.0, -3.0)]
    assert loss("orpo") == pytest.approx(5.0 + 0.1 * float(sp(torch.tensor(-(odds[0] - odds[1])))), rel=1e-6)
    assert loss("dpo", sft_weight=0.5) == pytest.approx(loss("dpo") + 0.5 * 5.0, rel=1e-6)
    zero = OBJECTIVES["dpo"](label_smoothing=0.2).pair_losses(ref, ref, lengths)[0]
    assert float(zero[0]) == pytest.approx(LN2, abs=1e-7)  # robust DPO is ln 2 at a zero margin too


def test_every_objective_is_registered_under_its_name():
    assert {"sft", "dpo", "ipo", "simpo", "orpo", "kto"} <= set(OBJECTIVES)
    assert all(isinstance(cls, type) and cls.name == name for name, cls in OBJECTIVES.items())


def test_rewards_and_the_edges_of_the_formulas():
    logps, ref, lengths = torch.tensor([[-1.0, -6.0]]), torch.tensor([[-2.0, -4.0]]), torch.tensor([[2.0, 3.0]])
    ratios = logps - ref  # (1, 2): [1, -2]
    for name in ("dpo", "ipo"):  # the implicit reward is beta times the log-ratio
        _, rewards = OBJECTIVES[name]().pair_losses(logps, ref, lengths)
        torch.testing.assert_close(rewards, 0.1 * ratios)
    sp = F.softplus
    h = torch.tensor(2.0 * (-1 / 2) - 2.0 * (-6 / 3) - 1.0)  # SimPO's margin
    robust = (0.9 * sp(-h) - 0.1 * sp(h)) / 0.8  # label smoothing reaches SimPO too
    assert float(OBJECTIVES["simpo"](label_smoothing=0.1).pair_losses(logps, ref, lengths)[0][0]) == \
        pytest.approx(float(robust), rel=1e-6)
    # ORPO at per-token means above -1 (no clamp in play) and at 0 (certain answer: finite, clamped)
    mean = logps / lengths
    odds = [m - math.log(1 - math.exp(m)) for m in mean[0].tolist()]
    expect = -mean[0, 0] + 0.1 * sp(-torch.tensor(odds[0] - odds[1]))
    assert float(OBJECTIVES["orpo"]().pair_losses(logps, ref, lengths)[0][0]) == pytest.approx(float(expect), rel=1e-6)
    for certain in ([[0.0, -6.0]], [[-1.0, 0.0]], [[0.0, 0.0]]):
        assert torch.isfinite(OBJECTIVES["orpo"]().pair_losses(torch.tensor(certain), ref, lengths)[0]).all(), certain


# -- log-probs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(tiny_tokenizer):
    data = prepare_pairs(DataConfig(dataset="sample", max_length=128, val_ratio=0, test_ratio=0), tiny_tokenizer)
    return data.splits["train"][:12]


def _logps_in_layout(model, pairs, pad_id, packing, flat):
    plan = batch_plan([len(s["input_ids"]) for s in pairs], 4, packing=packing, max_length=256, seed=0, epoch=0)
    out = torch.zeros(len(pairs), 2)
    with torch.no_grad():
        for mb in plan:
            batch = collate_pairs([pairs[i] for i in mb], pad_id, packing=packing, bins=mb.bins, flat=flat)
            out[list(mb)] = pair_logps(model, batch)[0]
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_pair_logps_equal_unpacked(arch, pairs, tiny_tokenizer):
    model = build_model(arch, len(tiny_tokenizer), attn=attention.NAME)
    pad = tiny_tokenizer.pad_token_id
    padded = _logps_in_layout(model, pairs, pad, packing=False, flat=False)
    for flat in (True, False):  # one flat row (varlen), or padded rows with a block-diagonal mask
        torch.testing.assert_close(_logps_in_layout(model, pairs, pad, packing=True, flat=flat), padded,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_are_skipped_and_padding_ignored(method, pairs, tiny_tokenizer):
    model = get_method(method).apply(build_model("llama", len(tiny_tokenizer)), get_method(method).config_cls(),
                                     tiny_tokenizer).eval()
    batched = _logps_in_layout(model, pairs, tiny_tokenizer.pad_token_id, packing=False, flat=False)
    with torch.no_grad():
        for k, s in enumerate(pairs[:4]):  # each answer alone, no padding, log-softmax by hand
            for j, seg in enumerate(split_pair(s)):
                ids, labels = torch.tensor([seg["input_ids"]]), torch.tensor(seg["labels"])
                logits = model(input_ids=ids).logits[0, -ids.shape[1]:]  # (T, V): virtual positions cut
                logp = logits[:-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
                assert float(logp[labels[1:] != -100].sum()) == pytest.approx(float(batched[k, j]), rel=1e-5)


# -- training through the CLI --------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_dpo_step0_is_ln2_for_every_method(tiny_dirs, tmp_path, arch, method):
    out = tmp_path / "run"
    assert main(pref_args(tiny_dirs[arch], out, "--objective", "dpo", "--method", method, "--max-steps", "2",
                          "--lr", "1e-2")) == 0
    first, second = [m for m in metrics(out) if "loss" in m]
    assert first["loss"] == pytest.approx(LN2, abs=1e-5)
    assert first["reward_margin"] == pytest.approx(0, abs=1e-5)
    assert first["reward_chosen"] == pytest.approx(0, abs=1e-5)
    assert math.isfinite(second["loss"]) and second["loss"] != first["loss"]
    assert second["logp_chosen"] < 0 and second["length_chosen"] > 0 and second["length_rejected"] > 0
    assert (out / "reference_logps.safetensors").is_file()


@pytest.mark.parametrize("objective", ["ipo", "simpo", "orpo"])
@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_other_objectives_train(tiny_dirs, tmp_path, objective, method):
    out = tmp_path / "run"
    assert main(pref_args(tiny_dirs["llama"], out, "--objective", objective, "--method", method, "--max-steps", "3",
                          "--lr", "1e-2")) == 0
    logged = [m for m in metrics(out) if "loss" in m]
    assert len(logged) == 3 and all(math.isfinite(m["loss"]) for m in logged)
    assert logged[0]["loss"] != logged[-1]["loss"]
    if objective == "ipo":  # reference-based: zero log-ratios at step 0, (0 - 1/(2 beta))^2
        assert logged[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("objective", ["ipo", "simpo", "orpo"])
def test_every_objective_method_architecture(tiny_dirs, tmp_path, arch, method, objective):
    out = tmp_path / "run"
    assert main(pref_args(tiny_dirs[arch], out, "--objective", objective, "--method", method, "--max-steps", "2",
                          "--lr", "1e-2")) == 0
    assert all(math.isfinite(m["loss"]) for m in metrics(out) if "loss" in m)


def test_methods_list_is_the_registry():
    assert sorted(METHODS) == sorted(all_methods())


def test_killed_and_resumed_dpo_equals_uninterrupted(tiny_dirs, tmp_path):
    common = ["--objective", "dpo", "--max-steps", "16", "--lr", "3e-3", "--set", "train.save_every=2",
              "--set", "data.max_rows=40"]
    straight = tmp_path / "straight"
    assert main(pref_args(tiny_dirs["gpt2"], straight, *common)) == 0
    killed = tmp_path / "killed"
    proc = _cli(*pref_args(tiny_dirs["gpt2"], killed, *common))
    kill_after_checkpoint(proc, killed, 4, 14)  # as soon as a mid-run checkpoint exists
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    assert main(["train", "--resume", str(killed)]) == 0
    a, b = metrics(straight), metrics(killed)
    assert [m["step"] for m in b] == [m["step"] for m in a]
    for key in ("loss", "reward_margin", "logp_rejected"):
        assert [m[key] for m in b if key in m] == pytest.approx([m[key] for m in a if key in m], rel=1e-5, abs=1e-7)


def test_sft_then_dpo_with_init_from_and_eval(tiny_dirs, tmp_path, capsys):
    from chattune.training.reference import load_reference

    sft = tmp_path / "sft"
    assert main(pref_args(tiny_dirs["llama"], sft, "--max-steps", "4", "--lr", "3e-2")) == 0
    dpo, fresh = tmp_path / "dpo", tmp_path / "fresh"
    common = ["--objective", "dpo", "--max-steps", "3", "--lr", "1e-2"]
    assert main(pref_args(tiny_dirs["llama"], fresh, *common)) == 0
    args = pref_args(tiny_dirs["llama"], dpo, *common, "--init-from", str(sft))
    assert main(args[:1] + args[3:]) == 0  # without --model: the SFT run's model
    assert [m for m in metrics(dpo) if "loss" in m][0]["loss"] == pytest.approx(LN2, abs=1e-5)
    # the SFT run is the reference: its log-probs, not the base model's
    ref_sft, ref_base = load_reference(dpo)["train"], load_reference(fresh)["train"]
    assert ref_sft.shape == ref_base.shape and not torch.allclose(ref_sft, ref_base, rtol=1e-3)
    capsys.readouterr()
    assert main(["eval", str(dpo), "--json", "--num-generate", "2", "--max-new-tokens", "4", "--split", "train"]) == 0
    result = json.loads(capsys.readouterr().out)
    pairs = result["pairs"]
    for name in ("implicit_reward", "reference_likelihood", "longer_answer"):
        acc = pairs[name]
        assert 0 <= acc["low"] <= acc["accuracy"] <= acc["high"] <= 1
    assert pairs["n"] == load_reference(dpo)["train"].shape[0]
    assert "eos_share" in result["tuned"]["sampled"] and "eos_share" in result["base"]["greedy"]


@pytest.mark.parametrize("argv, message", [
    (["--objective", "dpo", "--format", "messages"], "two answers per prompt"),
    (["--objective", "ipo", "--set", "train.label_smoothing=0.1"], "label_smoothing applies to dpo and simpo"),
    (["--objective", "dpo", "--set", "train.beta=0"], "beta must be positive"),
    (["--objective", "dpo", "--init-from", "/nonexistent/run"], "not a chattune run directory"),
])
def test_preference_user_mistakes_get_one_line(tiny_dirs, tmp_path, capsys, fixtures, argv, message):
    if "messages" in argv:
        argv = [*argv, "--dataset", str(fixtures / "messages.jsonl")]
    assert main([*pref_args(tiny_dirs["gpt2"], tmp_path / "run", "--max-steps", "1"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_two_processes_equal_one_with_double_accumulation(tiny_dirs, tmp_path):
    import subprocess
    import sys

    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--objective", "dpo", "--max-steps", "2", "--lr", "1e-2", "--no-packing", "--set", "data.max_rows=24"]
    assert main(pref_args(tiny_dirs["llama"], one, *common, "--grad-accum", "4")) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "chattune.cli",
           *pref_args(tiny_dirs["llama"], two, *common, "--grad-accum", "2")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = [m for m in metrics(one) if "loss" in m], [m for m in metrics(two) if "loss" in m]
    for key in ("loss", "reward_accuracy", "reward_margin", "logp_chosen", "length_rejected"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-4, abs=1e-6), key


def test_sigterm_during_the_reference_pass_stops_it_and_resume_recomputes_it(tiny_dirs, tmp_path, monkeypatch, capsys):
    import os
    import signal

    import chattune.training.objectives as objectives

    common = ["--objective", "dpo", "--max-steps", "3", "--lr", "3e-3", "--batch-size", "1", "--no-packing"]
    straight = tmp_path / "straight"
    assert main(pref_args(tiny_dirs["gpt2"], straight, *common)) == 0
    real, calls = objectives.pair_logps, []

    def signalled(*a, **kw):  # the reference pass is the first caller: a SIGTERM arrives during it
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(objectives, "pair_logps", signalled)
    run = tmp_path / "run"
    assert main(pref_args(tiny_dirs["gpt2"], run, *common)) == 143
    assert len(calls) == 1  # stopped at the next batch, not after the whole pass
    assert "interrupted at step 0; continue with: chattune train --resume" in capsys.readouterr().err
    assert not (run / "reference_logps.safetensors").exists()
    monkeypatch.setattr(objectives, "pair_logps", real)
    assert main(["train", "--resume", str(run)]) == 0
    a, b = load_file(straight / "reference_logps.safetensors"), load_file(run / "reference_logps.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(run) if "loss" in m] == \
        pytest.approx([m["loss"] for m in metrics(straight) if "loss" in m], rel=1e-5)
