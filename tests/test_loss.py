"""chattune.training.loss.cross_entropy against torch's: the same losses and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chattune.training.loss import _CrossEntropy, cross_entropy


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
    torch.testing.assert_close(our_grad.float(), ref_grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2,
                               rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_cross_entropy_leaves_its_input_alone_and_takes_no_rows():
    logits = torch.randn(3, 10, requires_grad=True)
    before = logits.detach().clone()
    cross_entropy(logits, torch.tensor([1, 2, 3])).sum().backward()
    assert torch.equal(logits.detach(), before)
    assert cross_entropy(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)).shape == (0,)
