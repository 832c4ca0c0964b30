"""Token-level unlikelihood: the paper's sum over each answer's own earlier tokens, the same
in every batch layout, off by default, and wired into SFT training."""

from __future__ import annotations

import json

import pytest
import torch

import chattune.training.unlikelihood as ul
from chattune.models import attention
from chattune.cli import main
from chattune.data import IGNORE_INDEX, collate
from chattune.errors import UserError
from chattune.training.loss import answer_logits, shift_targets, token_loss_sum
from chattune.training.objectives import SFT, get_objective
from chattune.training.settings import TrainArgs
from chattune.training.unlikelihood import answer_runs, first_occurrences, unlikelihood_sum
from conftest import build_model
from tiny import tiny_dirs  # noqa: F401  (fixture)


def brute_force(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Welleck et al. eq. 4 written out: per loss position, walk back through its answer."""
    total, n = logits.new_zeros(()), 0
    for b in range(keep.shape[0]):
        for t in range(keep.shape[1]):
            if not keep[b, t]:
                continue
            s, seen = t - 1, set()
            while s >= 0 and keep[b, s]:
                seen.add(int(targets[b, s]))
                s -= 1
            p = torch.softmax(logits[n], -1)
            for c in seen - {int(targets[b, t])}:
                total = total - torch.log((1 - p[c]).clamp_min(ul.MIN_COMPLEMENT))
            n += 1
    return total


@pytest.mark.parametrize("chunk", [128, 5, 1])
def test_equals_the_paper_written_out(chunk, monkeypatch):
    monkeypatch.setattr(ul, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 40, generator=g) < 0.7
    targets = torch.randint(0, 6, (3, 40), generator=g)  # a small vocabulary: many repeats
    logits = torch.randn(int(keep.sum()), 6, generator=g, dtype=torch.float64, requires_grad=True)
    got = unlikelihood_sum(logits, targets[keep], answer_runs(keep))
    want = brute_force(logits, targets, keep)
    assert abs(got.item() - want.item()) < 1e-4 * want.item()
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-6)


def test_answers_are_runs_within_a_row():
    keep = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 1]], dtype=torch.bool)
    # the run at the end of row 0 does not continue into the start of row 1
    assert answer_runs(keep).tolist() == [0, 0, 1, 2, 2, 3]
    targets = torch.tensor([5, 5, 5, 7, 7, 5])
    assert first_occurrences(targets, answer_runs(keep)).tolist() == [True, False, True, True, False, True]


def test_no_repeats_no_loss_and_the_target_is_never_a_candidate():
    keep = torch.ones(1, 4, dtype=torch.bool)
    logits = torch.randn(4, 10, requires_grad=True)
    assert unlikelihood_sum(logits, torch.tensor([1, 2, 3, 4]), answer_runs(keep)).item() > 0  # earlier tokens
    assert unlikelihood_sum(logits, torch.tensor([3, 3, 3, 3]), answer_runs(keep)).item() == 0  # only the target
    assert unlikelihood_sum(logits[:0], torch.tensor([], dtype=torch.long), answer_runs(keep[:, :0])).item() == 0


def test_the_sum_is_float32_and_made_on_the_logits_device():
    keep = torch.ones(2, 70, dtype=torch.bool)  # two answers of 70: chunks straddle the second's start
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 9, (140,), generator=g)
    runs = answer_runs(keep)
    first = first_occurrences(targets, runs)
    assert first.dtype == torch.bool and first[0] and first[70]  # each answer's first token is new
    logits = torch.randn(140, 9, generator=g, requires_grad=True)
    want = unlikelihood_sum(logits, targets, runs)
    (want_grad,) = torch.autograd.grad(want, logits)
    with torch.device("meta"):  # a tensor made without the logits' device breaks on the CPU too
        got = unlikelihood_sum(logits, targets, runs)
        (got_grad,) = torch.autograd.grad(got, logits)
    assert got.device == logits.device and torch.equal(got, want) and torch.equal(got_grad, want_grad)
    # bfloat16 logits: the sum is float32 even when no position has a candidate
    same = torch.full((4,), 3)  # the target is never its own candidate
    none = unlikelihood_sum(torch.randn(4, 9).bfloat16(), same, answer_runs(keep[:1, :4]))
    assert none.dtype == torch.float32 and none.item() == 0
    assert unlikelihood_sum(torch.randn(4, 9).bfloat16(), torch.tensor([1, 2, 1, 2]), answer_runs(keep[:1, :4])).dtype == torch.float32


def samples_with_loops(n: int) -> list[dict]:
    """Prompt tokens (no loss) then an answer that repeats itself."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 200, (5 + i,), generator=g).tolist()
        answer = (torch.randint(3, 200, (4,), generator=g).tolist() * 3)[: 6 + 2 * i] + [2]
        out.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return out


def ul_of(model, batch: dict) -> float:
    targets = shift_targets(batch["labels"])
    keep = targets != IGNORE_INDEX
    with torch.no_grad():
        logits = answer_logits(model, batch, keep)
        return float(unlikelihood_sum(logits, targets[keep], answer_runs(keep)))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_same_in_every_layout(arch, tiny_tokenizer):
    """Padded rows, mask-packed rows and one flat row: the same answers, the same sum."""
    model = build_model(arch, len(tiny_tokenizer), attention.NAME).eval()  # flat rows need its attention
    samples = samples_with_loops(4)
    pad = tiny_tokenizer.pad_token_id
    padded = ul_of(model, collate(samples, pad, packing=False))
    packed = ul_of(model, collate(samples, pad, packing=True, bins=[[0, 1], [2, 3]]))
    flat = ul_of(model, collate(samples, pad, packing=True, bins=[[0, 1, 2, 3]], flat=True))
    assert padded > 0
    assert packed == pytest.approx(padded, rel=1e-4) and flat == pytest.approx(padded, rel=1e-4)


def test_sft_objective_adds_it_only_when_asked(tiny_tokenizer):
    model = build_model("llama", len(tiny_tokenizer))
    batch = collate(samples_with_loops(3), tiny_tokenizer.pad_token_id, packing=False)
    plain, metrics = SFT().loss(model, batch)
    assert metrics.numel() == 0 and SFT().metrics == ()
    assert plain.item() == token_loss_sum(model, batch)[0].item()
    total, (ce, unl) = SFT(0.5).loss(model, batch)
    assert SFT(0.5).metrics == ("token_ce", "unlikelihood")
    assert abs(float(ce) - float(plain)) < 1e-4 and float(unl) == pytest.approx(ul_of(model, batch), rel=1e-4)
    assert float(total) == pytest.approx(float(ce) + 0.5 * float(unl), rel=1e-5)
    total.backward()  # the unlikelihood term reaches the weights
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_settings():
    assert TrainArgs().unlikelihood_alpha == 0 and get_objective(TrainArgs()).unlikelihood_alpha == 0
    with pytest.raises(UserError, match="unlikelihood_alpha must be >= 0"):
        TrainArgs(unlikelihood_alpha=-1)
    with pytest.raises(UserError, match="sft only"):
        TrainArgs(unlikelihood_alpha=1, objective="dpo")


def test_training_logs_both_terms(tiny_dirs, tmp_path):
    out = tmp_path / "ul"
    args = ["train", "--model", str(tiny_dirs["llama"]), "--dataset", "sample", "--output-dir", str(out),
            "--max-length", "256", "--max-steps", "2", "--set", "train.log_every=1",
            "--set", "train.unlikelihood_alpha=1"]
    assert main(args) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in logged if "loss" in m and "token_ce" in m)
    assert step["unlikelihood"] > 0
    assert step["loss"] == pytest.approx(step["token_ce"] + step["unlikelihood"], rel=1e-4)
