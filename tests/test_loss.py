"""chattune.training.loss: cross_entropy against torch's (the same losses and gradients, on the
logits' device), the positions the loss reads, and the wrapper it unwraps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chattune.data import IGNORE_INDEX
from chattune.methods import get_method
from chattune.training.loss import _CrossEntropy, answer_logits, cross_entropy, shift_targets, token_loss_sum, unwrap
from conftest import build_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, _CrossEntropy.CHUNK, 2 * _CrossEntropy.CHUNK + 5])
def test_cross_entropy_equals_torch(dtype, rows):
    torch.manual_seed(0)
    logits = (4 * torch.randn(rows, 300)).to(dtype)
    targets = torch.randint(0, 300, (rows,))
    weights = torch.rand(rows)  # a non-uniform upstream gradient
    results = []
    for fn in (cross_entropy, lambda x, t: F.cross_entropy(x.float(), t, reduction="none")):
        x = logits.clone().requires_grad_()
        loss = fn(x, targets)
        (loss * weights).sum().backward()
        results.append((loss.detach(), x.grad))
    (ours, our_grad), (ref, ref_grad) = results
    assert ours.dtype == torch.float32 and our_grad.dtype == dtype
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
    # bfloat16: the softmax is taken in float32 and rounded once, so within one bf16 step (2^-7) of
    # torch's float32 gradient; a softmax in bfloat16 is off by up to 7 %
    torch.testing.assert_close(our_grad.float(), ref_grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-5,
                               rtol=1e-5 if dtype == torch.float32 else 2 ** -7)


def test_cross_entropy_leaves_its_input_alone_and_takes_no_rows():
    logits = torch.randn(3, 10, requires_grad=True)
    before = logits.detach().clone()
    cross_entropy(logits, torch.tensor([1, 2, 3])).sum().backward()
    assert torch.equal(logits.detach(), before)
    assert cross_entropy(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_cross_entropy_makes_its_tensors_on_the_logits_device():
    # A CUDA batch must never meet a CPU tensor: with the default device moved elsewhere (meta),
    # a tensor made without device=logits.device breaks the loss or its gradient on the CPU too.
    logits = torch.randn(2 * _CrossEntropy.CHUNK + 3, 50)
    targets = torch.randint(0, 50, (logits.shape[0],))
    x = logits.clone().requires_grad_()
    cross_entropy(x, targets).sum().backward()
    want, want_grad = cross_entropy(logits, targets), x.grad
    with torch.device("meta"):
        got = cross_entropy(logits, targets)
    assert got.device == logits.device and torch.equal(got.detach(), want)
    # autograd runs backward outside the device context: call it directly inside one

    class Ctx:
        saved_tensors = (logits, targets, torch.logsumexp(logits, dim=-1))

    with torch.device("meta"):
        grad, _ = _CrossEntropy.backward(Ctx, torch.ones(logits.shape[0], device=logits.device))
    assert grad.device == logits.device and torch.allclose(grad, want_grad, atol=1e-6)


def test_token_loss_sum_scores_the_targets_it_is_given():
    torch.manual_seed(0)
    model = build_model("gpt2", 64)
    ids = torch.randint(0, 50, (1, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[0, 2] = 7  # one position, a token that is not the next one
    with torch.no_grad():
        total, count = token_loss_sum(model, batch, targets)
        logits = model(input_ids=ids).logits[0, 2]
        default, n = token_loss_sum(model, batch)
    assert count == 1 and torch.allclose(total, F.cross_entropy(logits, torch.tensor(7)), atol=1e-5)
    assert n == 5 and not torch.allclose(default, total)
    assert (shift_targets(batch["labels"])[0, :-1] == ids[0, 1:]).all()


def test_no_rows_give_an_empty_float32_loss():
    assert cross_entropy(torch.zeros(0, 10, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.long)).dtype == torch.float32


@pytest.mark.parametrize("method", ["full", "prompt"])  # prompt tuning prepends virtual positions
def test_full_logits_select_the_same_positions_as_the_head_hook(method, tiny_tokenizer):
    m = get_method(method)
    model = m.apply(build_model("llama", len(tiny_tokenizer)), m.config_cls(), tiny_tokenizer).eval()
    ids = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(2, 7, dtype=torch.bool)
    keep[0, 2:5], keep[1, 4:] = True, True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        selected = answer_logits(model, batch, keep)
        full = answer_logits(model, batch, keep, full_logits=True)
        whole = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -7:]
    assert selected.shape == (int(keep.sum()), len(tiny_tokenizer))
    torch.testing.assert_close(full, selected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, whole[keep], atol=1e-5, rtol=1e-5)


def test_unwrap_takes_a_distributed_wrappers_module_only():
    class Model(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like: .module, no LM head
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = Model()
    assert unwrap(Wrapper(inner)) is inner
    assert unwrap(inner) is inner
    both = Model()
    both.module = torch.nn.Linear(1, 1)  # a model that has its own LM head and a .module child stays
    assert unwrap(both) is both
    plain = torch.nn.Linear(1, 1)
    assert unwrap(plain) is plain
