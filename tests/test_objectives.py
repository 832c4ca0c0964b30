"""The objectives' plumbing, in-process and fast (``make mutate`` runs it): settings reach the
formulas, batches take the layout asked for, tie flags and references reach the loss, and the
metric window averages what it was given. The formulas themselves: test_preference.py and
test_ties_kto.py."""

from __future__ import annotations

import pytest
import torch

from chattune.data import IGNORE_INDEX, DataConfig
from chattune.data.pairs import prepare_pairs
from chattune.data.votes import prepare_kto
from chattune.training import objectives
from chattune.training.objectives import OBJECTIVES, MetricWindow, collate_pairs
from chattune.training.passes import pair_logps
from chattune.training.ties import tie_losses
from conftest import build_model

CFG = DataConfig(dataset="sample", max_length=128, val_ratio=0, test_ratio=0)


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer):
    return prepare_pairs(CFG, tiny_tokenizer).splits["train"][:4]


@pytest.fixture(scope="module")
def answers(tiny_tokenizer):
    return prepare_kto(CFG, tiny_tokenizer).splits["train"][:4]


def test_settings_reach_the_objectives():
    assert OBJECTIVES["dpo"](beta=0.3).beta == 0.3 and OBJECTIVES["dpo"]().beta == OBJECTIVES["dpo"].default_beta
    assert OBJECTIVES["simpo"](beta=1.5).beta == 1.5
    kto = OBJECTIVES["kto"](beta=0.2)
    assert kto.beta == 0.2 and (kto.desirable_weight, kto.undesirable_weight) == (1.0, 1.0)  # the paper's defaults


def test_pair_batches_take_the_layout_asked_for(pairs, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    padded = collate_pairs(pairs, pad, packing=False)  # padded rows, one per answer
    assert padded["input_ids"].shape[0] == 2 * len(pairs) and padded["attention_mask"].dim() == 2
    assert padded["pairs"] == len(pairs) and "ties" not in padded and "ref_logps" not in padded
    bins = [[0, 1], [2, 3]]
    packed = collate_pairs(pairs, pad, packing=True, bins=bins)  # not flat unless asked
    assert packed["input_ids"].shape[0] == 2 and packed["attention_mask"].dtype == torch.float32
    masked = collate_pairs(pairs, pad, packing=True, bins=bins, mask_dtype=torch.bfloat16)
    assert masked["attention_mask"].dtype == torch.bfloat16
    flat = collate_pairs(pairs, pad, packing=True, bins=bins, flat=True)
    assert flat["input_ids"].shape[0] == 1 and flat["attention_mask"].dim() == 2
    assert flat["input_ids"].shape[1] == int((padded["attention_mask"] == 1).sum())


def test_kto_batches_take_the_layout_asked_for(answers, tiny_tokenizer):
    pad, kto = tiny_tokenizer.pad_token_id, OBJECTIVES["kto"]()
    padded = kto.collate(answers, pad, packing=False)
    assert padded["input_ids"].shape[0] == len(answers) and padded["mismatched"]["input_ids"].shape[0] == len(answers)
    bins = [[0, 1], [2, 3]]
    packed = kto.collate(answers, pad, packing=True, bins=bins, mask_dtype=torch.bfloat16)
    for b in (packed, packed["mismatched"]):
        assert b["input_ids"].shape[0] == 2 and b["attention_mask"].dtype == torch.bfloat16
    flat = kto.collate(answers, pad, packing=True, bins=bins, flat=True)
    for b in (flat, flat["mismatched"]):
        assert b["input_ids"].shape[0] == 1 and b["attention_mask"].dim() == 2


def test_tie_flags_reach_the_tie_loss(pairs, tiny_tokenizer):
    model, pad = build_model("llama", len(tiny_tokenizer)), tiny_tokenizer.pad_token_id
    with torch.no_grad():
        logps, _ = pair_logps(model, collate_pairs(pairs, pad, packing=False))
    shift = torch.tensor([[0.7, -0.4], [-1.2, 0.3], [0.2, 0.9], [-0.5, 0.8]])
    tied = [dict(s, ref=[lp[0] - d[0], lp[1] - d[1]], tie=k in (1, 3))
            for k, (s, lp, d) in enumerate(zip(pairs, logps.tolist(), shift.tolist()))]
    batch = collate_pairs(tied, pad, packing=False)
    assert batch["ties"].tolist() == [False, True, False, True]
    dpo = OBJECTIVES["dpo"](ties="davidson")
    loss, _ = dpo.loss(model, batch)
    d = 0.1 * (shift[:, 0] - shift[:, 1])
    want = tie_losses(d.double(), torch.tensor([False, True, False, True]), "davidson", dpo.tie_nu).sum()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-4)


def test_at_the_reference_no_pair_and_no_answer_counts_as_ranked_right(pairs, answers, tiny_tokenizer):
    """Margin 0 is not a win: the accuracy metric is 0 at step 0 (where policy = reference)."""
    model, pad = build_model("llama", len(tiny_tokenizer)), tiny_tokenizer.pad_token_id
    dpo, kto = OBJECTIVES["dpo"](), OBJECTIVES["kto"]()
    with torch.no_grad():
        logps, _ = pair_logps(model, collate_pairs(pairs, pad, packing=False))
        own, _ = kto.logps(model, kto.collate(answers, pad, packing=False))
        _, stats = dpo.loss(model, collate_pairs([dict(s, ref=lp) for s, lp in zip(pairs, logps.tolist())], pad,
                                                 packing=False))
        assert stats[dpo.metrics.index("reward_accuracy")] == 0 and stats[dpo.metrics.index("reward_margin")] == 0
        _, stats = kto.loss(model, kto.collate([dict(s, ref=lp) for s, lp in zip(answers, own.tolist())], pad,
                                               packing=False))
        assert stats[kto.metrics.index("reward_accuracy")] == 0 and stats[kto.metrics.index("kl")] == 0
        with pytest.raises(RuntimeError, match=r"^kto needs the reference log-probs \(Preference\.start\)$"):
            kto.loss(model, kto.collate(answers, pad, packing=False))


def test_pair_losses_need_a_reference_only_where_the_formula_has_one():
    logps, lengths = torch.tensor([[-1.0, -6.0]]), torch.tensor([[2.0, 3.0]])
    with pytest.raises(RuntimeError, match=r"^dpo needs the reference log-probs \(Preference\.start\)$"):
        OBJECTIVES["dpo"]().pair_losses(logps, None, lengths)
    for name in ("simpo", "orpo"):
        losses, _ = OBJECTIVES[name]().pair_losses(logps, None, lengths)
        assert torch.isfinite(losses).all()


def test_pair_losses_bring_the_reference_and_ties_to_the_log_probs():
    # the batch's reference and tie flags sit on the CPU; the log-probs may be on an accelerator
    # (meta stands in for one) and in another dtype
    logps = torch.tensor([[-1.0, -6.0], [-2.0, -2.5]], dtype=torch.float64, device="meta")
    ref = torch.tensor([[-2.0, -4.0], [-2.0, -2.0]])
    lengths = torch.tensor([[2.0, 3.0], [2.0, 2.0]], device="meta")
    losses, rewards = OBJECTIVES["dpo"](ties="davidson").pair_losses(logps, ref, lengths, torch.tensor([False, True]))
    assert losses.device.type == "meta" and rewards.dtype == torch.float64
    kto = OBJECTIVES["kto"]()
    kto.logps = lambda model, batch, full_logits=False: (logps, lengths)
    # the whole loss is computed on the log-probs' device; only the logged sums come back to the
    # CPU, which a meta tensor cannot do: reaching that copy is the pass
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        kto.loss(None, {"desirable": torch.tensor([True, False]), "ref_logps": ref})


def test_orpo_reward_is_beta_times_the_mean_log_likelihood():
    logps, lengths = torch.tensor([[-1.0, -6.0]]), torch.tensor([[2.0, 3.0]])
    _, rewards = OBJECTIVES["orpo"]().pair_losses(logps, None, lengths)
    torch.testing.assert_close(rewards, 0.1 * logps / lengths)


def test_sft_batches_count_their_loss_tokens_and_validate_in_the_dtype_asked(monkeypatch):
    sft = OBJECTIVES["sft"]()
    samples = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [IGNORE_INDEX] * 3 + [8, 9, 10]},
               {"input_ids": [5, 6], "labels": [IGNORE_INDEX, 6]}]
    batch = sft.collate(samples, 3, packing=False)
    assert batch["input_ids"][1].tolist() == [5, 6, 3, 3, 3, 3]  # padded with the pad id
    assert sft.units(batch) == 4  # the tokens the next-token loss scores (position 0 predicts nothing)
    seen = {}

    def loss_on_samples(model, samples, pad_id, batch_size, device, dtype):
        seen.update(dtype=dtype, pad=pad_id, batch_size=batch_size)
        return {"loss": 1.25}

    monkeypatch.setattr(objectives, "loss_on_samples", loss_on_samples)
    assert sft.validate(None, samples, 3, 2, "cpu", torch.bfloat16) == 1.25
    assert seen == {"dtype": torch.bfloat16, "pad": 3, "batch_size": 2}


def test_the_metric_window_averages_everything_added_since_the_last_pop():
    window = MetricWindow(("a", "b"))
    assert window.pop() == {}
    window.add(torch.tensor([2.0 ** 24, 3.0]), 2)
    window.add(torch.tensor([1.0, float("nan")]), 1)  # float64 sums: 2^24 + 1 is kept
    assert window.pop() == {"a": (2.0 ** 24 + 1) / 3}  # a metric that is not finite is left out
    assert window.pop() == {}
    window.add(torch.tensor([4.0, 6.0]), 2)
    assert window.pop() == {"a": 2.0, "b": 3.0}


def test_the_preference_collate_passes_the_layout_through(pairs, tiny_tokenizer):
    pad, dpo, bins = tiny_tokenizer.pad_token_id, OBJECTIVES["dpo"](), [[0, 1], [2, 3]]
    padded = dpo.collate(pairs, pad, packing=False)
    assert padded["input_ids"].shape[0] == 2 * len(pairs) and (padded["input_ids"][padded["attention_mask"] == 0] == pad).all()
    assert (padded["attention_mask"] == 0).any()  # the answers differ in length: there is padding to check
    packed = dpo.collate(pairs, pad, packing=True, bins=bins, mask_dtype=torch.bfloat16)
    assert packed["input_ids"].shape[0] == 2 and packed["attention_mask"].dtype == torch.bfloat16
    assert dpo.collate(pairs, pad, packing=True, bins=bins, flat=True)["input_ids"].shape[0] == 1


def test_dpo_settings_come_from_the_train_arguments(monkeypatch):
    from chattune.training.settings import TrainArgs
    smoothed = objectives.get_objective(TrainArgs(objective="dpo", label_smoothing=0.1))
    assert smoothed.label_smoothing == 0.1 and smoothed.ties == "drop"
    dpo = objectives.get_objective(TrainArgs(objective="dpo", beta=0.3, sft_weight=0.2, ties="davidson", tie_nu=0.7))
    assert (dpo.beta, dpo.sft_weight, dpo.ties, dpo.tie_nu) == (0.3, 0.2, "davidson", 0.7)
    asked = []
    monkeypatch.setattr(objectives, "prepare_pairs", lambda cfg, tok, ties: asked.append(ties))
    dpo.prepare(CFG, None)
    OBJECTIVES["dpo"]().prepare(CFG, None)  # ties dropped by default: no tie pairs are built
    assert asked == [True, False]


def test_preference_training_switches_dropout_off():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.3), torch.nn.Sequential(torch.nn.Dropout(0.1)))
    objectives.disable_dropout(model)
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0]
