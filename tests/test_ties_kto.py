"""Tie-aware DPO and KTO: losses against the formulas written out in float64 (values and
gradients), DPO's no-tie limit, the tie loss's minimum, z0 without gradient, step-0 values,
and training through the real CLI with every method."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chattune.cli import main
from chattune.training.kto import balance_warning, kto_losses
from chattune.training.objectives import OBJECTIVES
from chattune.training.ties import DEFAULT_NU, tie_losses
from test_preference import METHODS, pref_args
from test_train import metrics
from tiny import tiny_dirs  # noqa: F401  (fixture)

D = torch.tensor([-3.0, -0.7, 0.0, 0.4, 2.5], dtype=torch.float64)
TIE = torch.tensor([False, True, True, False, True])


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def rao_kupper(d: float, tie: bool, nu: float) -> float:
    a = math.log(nu)
    if tie:
        return -math.log((nu ** 2 - 1) * sig(d - a) * sig(-d - a))
    return -math.log(sig(d - a))


def davidson(d: float, tie: bool, nu: float) -> float:
    z = math.exp(d / 2) + math.exp(-d / 2) + nu
    return -math.log((nu if tie else math.exp(d / 2)) / z)


def numeric_grad(f, x: float, h: float = 1e-6) -> float:
    return (f(x + h) - f(x - h)) / (2 * h)


@pytest.mark.parametrize("model, formula", [("rao-kupper", rao_kupper), ("davidson", davidson)])
@pytest.mark.parametrize("nu", [None, 3.0])
def test_tie_losses_follow_the_formulas_in_values_and_gradients(model, formula, nu):
    nu = DEFAULT_NU[model] if nu is None else nu
    d = D.clone().requires_grad_(True)
    losses = tie_losses(d, TIE, model, nu)
    losses.sum().backward()
    for i in range(len(D)):
        x, t = float(D[i]), bool(TIE[i])
        assert float(losses[i].detach()) == pytest.approx(formula(x, t, nu), rel=1e-12)
        assert float(d.grad[i]) == pytest.approx(numeric_grad(lambda v: formula(v, t, nu), x), rel=1e-6, abs=1e-9)


def test_defaults_give_a_tie_probability_of_one_fifth_at_zero_margin():
    for model in ("rao-kupper", "davidson"):
        p_tie = math.exp(-float(tie_losses(torch.zeros(1, dtype=torch.float64), torch.tensor([True]), model,
                                           DEFAULT_NU[model])[0]))
        assert p_tie == pytest.approx(0.2, rel=1e-12)


@pytest.mark.parametrize("model, limit", [("rao-kupper", 1.0), ("davidson", 0.0)])
def test_no_ties_at_the_no_tie_nu_is_plain_dpo(model, limit):
    logps = torch.tensor([[-10.0, -12.0], [-8.0, -7.5], [-20.0, -20.0]], dtype=torch.float64)
    ref = torch.tensor([[-11.0, -11.0], [-8.5, -7.0], [-19.0, -21.0]], dtype=torch.float64)
    lengths = torch.tensor([[2.0, 4.0], [3.0, 3.0], [5.0, 6.0]], dtype=torch.float64)
    plain = OBJECTIVES["dpo"]().pair_losses(logps, ref, lengths)
    tied = OBJECTIVES["dpo"](ties=model, tie_nu=limit).pair_losses(logps, ref, lengths)
    assert torch.allclose(plain[0], tied[0], rtol=1e-12) and torch.equal(plain[1], tied[1])
    # away from the limit a decided pair costs more than in DPO (some mass goes to ties)
    assert (OBJECTIVES["dpo"](ties=model).pair_losses(logps, ref, lengths)[0] > plain[0]).all()


@pytest.mark.parametrize("model", ["rao-kupper", "davidson"])
def test_the_tie_loss_is_least_at_zero_margin(model):
    d = torch.arange(-400, 401, dtype=torch.float64) / 100
    losses = tie_losses(d, torch.ones_like(d, dtype=torch.bool), model, DEFAULT_NU[model])
    assert float(d[losses.argmin()]) == 0.0
    assert torch.allclose(losses, losses.flip(0), rtol=1e-12)  # even in d: A and B are interchangeable


def test_an_unknown_tie_model_is_named():
    with pytest.raises(ValueError, match="^unknown tie model 'bradley'$"):
        tie_losses(torch.zeros(1), torch.zeros(1, dtype=torch.bool), "bradley", 1.0)


def test_dpo_reads_tie_pairs_from_the_batch():
    logps, ref = torch.tensor([[-10.0, -12.0]]), torch.tensor([[-11.0, -11.0]])
    lengths = torch.tensor([[2.0, 4.0]])
    dpo = OBJECTIVES["dpo"](ties="davidson")
    d = 0.1 * ((-10 + 11) - (-12 + 11))
    won = float(dpo.pair_losses(logps, ref, lengths)[0][0])
    tied = float(dpo.pair_losses(logps, ref, lengths, torch.tensor([True]))[0][0])
    assert won == pytest.approx(davidson(d, False, 0.5), rel=1e-6)
    assert tied == pytest.approx(davidson(d, True, 0.5), rel=1e-6)


# -- KTO ----------------------------------------------------------------------------------------
def kto_formula(r, kl_ratios, desirable, beta, wd, wu):
    z0 = max(0.0, sum(kl_ratios) / len(kl_ratios))
    return [wd * (1 - sig(beta * (x - z0))) if good else wu * (1 - sig(beta * (z0 - x)))
            for x, good in zip(r, desirable)]


@pytest.mark.parametrize("kl_shift", [2.0, -5.0])  # a positive KL estimate, and one clamped to 0
def test_kto_loss_follows_the_paper(kl_shift):
    logps = torch.tensor([[-10.0, -30.0], [-12.0, -25.0], [-7.0, -40.0], [-9.0, -33.0]], dtype=torch.float64)
    ref = torch.tensor([[-11.0, -30.0 - kl_shift], [-11.5, -26.0 - kl_shift], [-9.0, -39.0 - kl_shift],
                        [-8.0, -34.0 - kl_shift]], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    logps.requires_grad_(True)
    losses, r, z0 = kto_losses(logps, ref, desirable, 0.1, 1.5, 0.7)
    ratios = (logps - ref).detach()
    expect = kto_formula(ratios[:, 0].tolist(), ratios[:, 1].tolist(), desirable.tolist(), 0.1, 1.5, 0.7)
    assert losses.tolist() == pytest.approx(expect, rel=1e-12)
    assert float(z0) == pytest.approx(max(0.0, float(ratios[:, 1].mean())), rel=1e-12)
    losses.sum().backward()
    # z0 gets no gradient: the mismatched answers' log-probs receive none
    assert torch.equal(logps.grad[:, 1], torch.zeros(4, dtype=torch.float64))
    for i in range(4):
        def f(x, i=i):
            rr = ratios[:, 0].tolist()
            rr[i] = x
            return kto_formula(rr, ratios[:, 1].tolist(), desirable.tolist(), 0.1, 1.5, 0.7)[i]
        assert float(logps.grad[i, 0]) == pytest.approx(numeric_grad(f, float(ratios[i, 0])), rel=1e-6)


def test_kto_at_the_reference_costs_half_each_weight():
    logps = torch.tensor([[-10.0, -30.0], [-12.0, -25.0]])
    losses, r, z0 = kto_losses(logps, logps.clone(), torch.tensor([True, False]), 0.1, 1.0, 2.0)
    assert losses.tolist() == [0.5, 1.0] and float(z0) == 0.0


def test_balance_rule():
    assert balance_warning(100, 100, 1.0, 1.0) is None  # ratio 1
    assert balance_warning(130, 100, 1.0, 1.0) is None  # 1.3 <= 4/3
    assert balance_warning(4, 3, 1.0, 1.0) is None  # exactly 4/3: inside, the bound is closed
    assert balance_warning(3, 3, 1.0, 1.0) is None  # exactly 1
    message = balance_warning(38, 54, 1.0, 1.0)  # more undesirable than desirable answers
    assert "0.70" in message and "kto_desirable_weight=1.42 to 1.89 meets it" in message  # 54/38 and 4/3 of it
    for n_d, n_u in ((10, 0), (0, 10)):
        assert balance_warning(n_d, n_u, 1.0, 1.0) == (f"kto: the training split has {n_d} desirable and {n_u} "
                                                       "undesirable answers; KTO learns from both kinds")


# -- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_kto_step0_is_half_and_it_trains(tiny_dirs, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(pref_args(tiny_dirs["llama"], out, "--objective", "kto", "--method", method, "--max-steps", "3")) == 0
    rows = metrics(out)
    steps = [r for r in rows if "loss" in r and r.get("step", 0) >= 1]
    # at step 1 the policy is the reference: r = z0 = 0 and each answer costs lambda / 2
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-5) and steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert "kto: lambda_D n_D / (lambda_U n_U)" in capsys.readouterr().err  # the sample's first 16 rows are unbalanced


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_kto_and_tie_dpo_train_with_every_method(tiny_dirs, tmp_path, method):
    for extra in (["--objective", "kto"], ["--objective", "dpo", "--set", "train.ties=rao-kupper"]):
        out = tmp_path / extra[1]
        assert main(pref_args(tiny_dirs["gpt2"], out, "--method", method, "--max-steps", "2", *extra)) == 0
        assert all(math.isfinite(r["loss"]) for r in metrics(out) if "loss" in r)


def test_tie_dpo_trains_on_tie_pairs_and_eval_ranks_decided_pairs(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "ties"
    assert main(pref_args(tiny_dirs["llama"], out, "--objective", "dpo", "--max-steps", "2",
                          "--set", "train.ties=davidson", "--set", "data.max_rows=32")) == 0
    first = next(r for r in metrics(out) if "loss" in r)
    assert first["loss"] > math.log(2)  # decided pairs cost -log(1/(2 + nu)) > ln 2, tie pairs -log(nu/(2 + nu))
    assert main(["eval", str(out), "--split", "train", "--max-samples", "4", "--num-generate", "1",
                 "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pairs"]["objective"] == "dpo"


def test_ties_and_kto_settings_are_checked(tiny_dirs, tmp_path, capsys):
    for sets, message in ((["train.ties=davidson"], "train.ties applies to train.objective dpo"),
                          (["train.ties=rao-kupper", "train.tie_nu=1"], "train.tie_nu must be above 1"),
                          (["train.kto_desirable_weight=0"], "must be positive")):
        argv = pref_args(tiny_dirs["llama"], tmp_path / "x", "--objective", "ipo" if "ties=davidson" in sets[0] else "dpo")
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_kto_eval_ranks_decided_votes_and_desirable_answers(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "kto"
    assert main(pref_args(tiny_dirs["llama"], out, "--objective", "kto", "--max-steps", "2")) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "train", "--max-samples", "40", "--num-generate", "1",
                 "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "kto: desirable over undesirable (AUC)" in text and "tuned model's implicit reward" in text
    result = json.loads((out / "eval-train" / "result.json").read_text())
    pairs = result["pairs"]
    assert pairs["objective"] == "kto" and 0 < 2 * pairs["pairs"] <= pairs["n"] <= 40
    auc = pairs["desirable_vs_undesirable"]
    assert auc["low"] <= auc["accuracy"] <= auc["high"]


def test_bootstrap_auc_counts_ties_half():
    from chattune.evaluate.pairs import bootstrap_auc

    auc = bootstrap_auc(torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert auc["accuracy"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)


def test_killed_and_resumed_kto_equals_uninterrupted(tiny_dirs, tmp_path):
    from test_train import _cli
    from tiny import kill_after_checkpoint

    common = ["--objective", "kto", "--max-steps", "12", "--lr", "3e-3", "--set", "train.save_every=2",
              "--set", "data.max_rows=40"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(pref_args(tiny_dirs["gpt2"], straight, *common)) == 0
    proc = _cli(*pref_args(tiny_dirs["gpt2"], killed, *common))
    kill_after_checkpoint(proc, killed, 4, 10)  # as soon as a mid-run checkpoint exists
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    assert main(["train", "--resume", str(killed)]) == 0  # reads the stored reference back
    a, b = metrics(straight), metrics(killed)
    assert [m["step"] for m in b] == [m["step"] for m in a]
    for key in ("loss", "kl", "reward_margin"):
        assert [m[key] for m in b if key in m] == pytest.approx([m[key] for m in a if key in m], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("packing,flat", [(False, False), (True, False), (True, True)])
def test_kto_scores_mismatched_answers_without_gradient_and_as_the_pair_layout(tiny_tokenizer, packing, flat):
    """The training forward holds the own answers only; the mismatched ones (z0's) go through a
    second forward under no_grad; both give the log-probs the pair layout gives in one forward."""
    from chattune.data import DataConfig, batch_plan
    from chattune.data.votes import prepare_kto
    from chattune.models import attention
    from chattune.training.objectives import collate_pairs
    from chattune.training.passes import pair_logps
    from conftest import build_model

    data = prepare_kto(DataConfig(dataset="sample", max_length=128, val_ratio=0, test_ratio=0), tiny_tokenizer)
    samples = data.splits["train"][:6]
    model, kto, pad = build_model("llama", len(tiny_tokenizer), attn=attention.NAME), OBJECTIVES["kto"](), tiny_tokenizer.pad_token_id
    seen = []
    model.register_forward_hook(lambda m, args, kw, out: seen.append(
        (torch.is_grad_enabled(), int(kw["attention_mask"].bool().sum()) if kw["attention_mask"].dim() == 2
         else int((kw["input_ids"] != pad).sum()))), with_kwargs=True)
    plan = batch_plan([len(s["input_ids"]) for s in samples], 3, packing=packing, max_length=256, seed=0, epoch=0)
    for mb in plan:
        group = [samples[i] for i in mb]
        batch = kto.collate(group, pad, packing=packing, bins=mb.bins, flat=flat)
        seen.clear()
        logps, lengths = kto.logps(model, batch)
        assert [grad for grad, _ in seen] == [True, False]
        assert logps.requires_grad and logps[:, 0].requires_grad
        with torch.no_grad():
            expect, expect_len = pair_logps(model, collate_pairs(group, pad, packing=packing, bins=mb.bins, flat=flat))
        torch.testing.assert_close(logps.detach(), expect, rtol=1e-5, atol=1e-5)
        assert torch.equal(lengths, expect_len)
        logps[:, 0].sum().backward()  # the own answers train; the mismatched column has no graph
        assert logps.grad_fn is not None


def test_loss_sums_and_metrics_of_dpo_and_kto(tiny_tokenizer):
    """``loss`` returns the sum of the per-pair (per-answer) losses and the sums of the metrics
    the loop logs, in the order ``metrics`` names them."""
    from chattune.data import DataConfig
    from chattune.data.pairs import prepare_pairs
    from chattune.data.votes import prepare_kto
    from chattune.training.objectives import METRICS, collate_pairs
    from chattune.training.passes import pair_logps
    from conftest import build_model

    cfg = DataConfig(dataset="sample", max_length=128, val_ratio=0, test_ratio=0)
    model, pad = build_model("llama", len(tiny_tokenizer)), tiny_tokenizer.pad_token_id
    shift = torch.tensor([[0.7, -0.4], [-1.2, 0.3], [0.2, 0.9], [-0.5, 0.8]])  # reference = policy - shift
    pairs = prepare_pairs(cfg, tiny_tokenizer).splits["train"][:4]
    with torch.no_grad():
        logps, lengths = pair_logps(model, collate_pairs(pairs, pad, packing=False))
    for s, lp, d in zip(pairs, logps.tolist(), shift.tolist()):
        s["ref"] = [lp[0] - d[0], lp[1] - d[1]]
    dpo = OBJECTIVES["dpo"]()
    assert dpo.metrics == METRICS
    loss, stats = dpo.loss(model, collate_pairs(pairs, pad, packing=False))
    rewards = 0.1 * shift
    margin = rewards[:, 0] - rewards[:, 1]
    expect = [(margin > 0).sum(), margin.sum(), rewards[:, 0].sum(), rewards[:, 1].sum(), logps[:, 0].sum(),
              logps[:, 1].sum(), lengths[:, 0].sum(), lengths[:, 1].sum()]
    torch.testing.assert_close(stats, torch.stack(expect).double(), rtol=1e-4, atol=1e-4)
    assert float(loss.detach()) == pytest.approx(float(torch.nn.functional.softplus(-margin).sum()), rel=1e-4)

    kto = OBJECTIVES["kto"](beta=0.1, desirable_weight=1.5, undesirable_weight=0.7)
    answers = prepare_kto(cfg, tiny_tokenizer).splits["train"][:4]
    with torch.no_grad():
        logps, lengths = kto.logps(model, kto.collate(answers, pad, packing=False))
    for s, lp, d in zip(answers, logps.tolist(), shift.tolist()):
        s["ref"] = [lp[0] - d[0], lp[1] - d[1]]
    desirable = torch.tensor([bool(s["label"]) for s in answers])
    assert desirable.any() and not desirable.all()
    loss, stats = kto.loss(model, kto.collate(answers, pad, packing=False))
    z0 = max(0.0, float(shift[:, 1].mean()))
    r = shift[:, 0]
    sign = desirable.float() * 2 - 1
    margin = sign * 0.1 * (r - z0)
    expect = [torch.tensor(4 * z0), (margin > 0).sum(), margin.sum(), logps[:, 0].sum(), lengths[:, 0].sum()]
    torch.testing.assert_close(stats, torch.stack(expect).double(), rtol=1e-4, atol=1e-4)
    losses = kto_formula(r.tolist(), shift[:, 1].tolist(), desirable.tolist(), 0.1, 1.5, 0.7)
    assert float(loss.detach()) == pytest.approx(sum(losses), rel=1e-4)
