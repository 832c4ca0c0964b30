"""NEFTune: noise on the input embeddings in training only, scaled per conversation, off by default."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chattune.cli import main
from chattune.data import collate
from chattune.errors import UserError
from chattune.training.neftune import add_neftune, sequence_lengths
from chattune.training.settings import TrainArgs
from conftest import build_model
from tiny import tiny_dirs  # noqa: F401  (fixture)

ALPHA = 5.0


def noise_of(model, batch: dict) -> torch.Tensor:
    """The embedding output minus the clean embeddings, (B, T, d), for one forward over ``batch``."""
    seen = []
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, a, out: seen.append(out.detach()))  # runs after NEFTune's hook
    with torch.no_grad():
        model(**batch)
        handle.remove()
        return seen[0] - emb.weight[batch["input_ids"]]


def samples(lengths: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, 200, (n,), generator=g).tolist(), "labels": [-100] * n} for n in lengths]


def bound(length: int, d: int) -> float:
    return ALPHA / math.sqrt(length * d)


def check_scale(noise: torch.Tensor, expected: torch.Tensor) -> None:
    """Uniform on [-b, b] per token: within the bound, reaching close to it, mean |x| about b/2."""
    ratio = noise.abs() / expected[..., None]  # (B, T, d), U(0, 1) if the scale is right
    assert float(ratio.max()) <= 1 + 1e-5
    assert float(ratio.amax(-1).min()) > 0.9  # 64 draws per token: each reaches 90% of its bound
    assert abs(float(ratio.mean()) - 0.5) < 0.05


def test_off_by_default(tiny_tokenizer):
    assert TrainArgs().neftune_alpha == 0
    model = build_model("gpt2", len(tiny_tokenizer))
    assert add_neftune(model, 0.0) is None
    assert not model.get_input_embeddings()._forward_hooks and not model._forward_pre_hooks
    with pytest.raises(UserError, match="neftune_alpha"):
        TrainArgs(neftune_alpha=-1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_noise_only_in_train_mode_and_none_on_eval(tiny_tokenizer, arch):
    model = build_model(arch, len(tiny_tokenizer))
    batch = collate(samples([5, 9]), 0, packing=False)
    del batch["labels"]
    with torch.no_grad():
        clean = model(**batch).logits
    neft = add_neftune(model, ALPHA)
    model.eval()
    assert torch.equal(noise_of(model, batch), torch.zeros_like(noise_of(model, batch)))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, clean)  # evaluation and decoding see clean embeddings
    model.train()
    assert float(noise_of(model, batch).abs().max()) > 0
    neft.remove()
    assert torch.equal(noise_of(model, batch), torch.zeros_like(noise_of(model, batch)))


def test_padded_rows_scale_by_their_own_length(tiny_tokenizer):
    model = build_model("gpt2", len(tiny_tokenizer)).train()
    d = model.config.n_embd
    add_neftune(model, ALPHA)
    batch = collate(samples([4, 16]), 0, packing=False)
    del batch["labels"]
    noise = noise_of(model, batch)  # (2, 16, d); row 0 has 12 padding tokens
    expected = torch.tensor([[bound(4, d)] * 16, [bound(16, d)] * 16])
    check_scale(noise, expected)


@pytest.mark.parametrize("flat", [True, False])
def test_packed_conversations_scale_by_their_own_length(tiny_tokenizer, flat):
    model = build_model("gpt2", len(tiny_tokenizer)).train()
    d = model.config.n_embd
    add_neftune(model, ALPHA)
    batch = collate(samples([6, 20, 10]), 0, packing=True, bins=[[0, 1, 2]], flat=flat)
    del batch["labels"]
    noise = noise_of(model, batch)  # (1, 36, d): three conversations in one row
    expected = torch.tensor([[bound(6, d)] * 6 + [bound(20, d)] * 20 + [bound(10, d)] * 10])
    check_scale(noise, expected)


def test_sequence_lengths():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert sequence_lengths(positions, None).tolist() == [[3, 3, 3, 2, 2, 1], [4, 4, 4, 4, 2, 2]]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert sequence_lengths(None, mask).tolist() == [[2, 2, 2], [3, 3, 3]]
    assert sequence_lengths(None, None) is None


def test_training_with_neftune_changes_the_training_loss_only(tiny_dirs, tmp_path):
    """With a learning rate too small to move a float32 weight, the runs differ only by the
    noise: the training loss differs, the validation loss (eval mode) is bit-identical."""
    def run(name: str, alpha: float) -> list[dict]:
        out = tmp_path / name
        args = ["train", "--model", str(tiny_dirs["gpt2"]), "--dataset", "sample", "--output-dir", str(out),
                "--max-length", "256", "--max-steps", "2", "--lr", "1e-12", "--set", "train.log_every=1",
                "--set", "train.warmup_ratio=0", "--set", f"train.neftune_alpha={alpha}"]
        assert main(args) == 0
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    plain, noisy = run("plain", 0.0), run("noisy", 50.0)
    first = [next(m["loss"] for m in ms if "loss" in m) for ms in (plain, noisy)]
    assert first[0] != first[1]  # same seed, same batch: only the noise differs at step 1
    val = [[m["val_loss"] for m in ms if "val_loss" in m] for ms in (plain, noisy)]
    assert val[0] and val[0] == val[1]
