"""Two kernel choices behind chattune's training step, each against its alternative, in one process.

    .venv/bin/python benchmarks/step_kernels.py

1. Attention of one packed conversation (``chattune.models.attention``): causal sdpa forward +
   backward on (1, heads, n, head_dim) at SmolLM2's shape (9 heads x 64), for typical
   conversation lengths n: torch's flash kernel in bfloat16 (what autocast picks), the same
   kernel in float32 (what chattune runs on CPU), and the math kernel.
2. Cross-entropy of the loss positions' bf16 logits (N, 49,152) (``chattune.training.loss``):
   chattune's chunked function against ``F.cross_entropy(logits.float())``, forward + backward.
3. Collation of one step's packed row of 4 conversations (``chattune.data.collate``), flat
   and with the 4D mask: the data work left on the step's critical path.

Prints a table per part and one JSON line; times are medians of repeated calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from chattune.data import collate
from chattune.training.loss import cross_entropy


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def attention_case(n: int, dtype: torch.dtype, backend: SDPBackend, heads: int, dim: int):
    q, k, v = (torch.randn(1, heads, n, dim, dtype=dtype, requires_grad=True) for _ in range(3))

    def run():
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    return run


def cross_entropy_case(rows: int, vocab: int, ours: bool):
    logits = torch.randn(rows, vocab).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (rows,))

    def run():
        loss = cross_entropy(logits, targets) if ours else F.cross_entropy(logits.float(), targets, reduction="none")
        loss.sum().backward()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="64,150,300,600", help="conversation lengths for the attention part")
    p.add_argument("--rows", type=int, default=380, help="loss positions for the cross-entropy part")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    out = {"threads": torch.get_num_threads(), "attention_ms": {}, "cross_entropy_ms": {}}
    print(f"causal attention forward + backward, 9 heads x 64, {torch.get_num_threads()} threads (ms, median)")
    print("| tokens | flash bf16 | flash fp32 | math bf16 | flash fp32 vs flash bf16 |")
    print("|---:|---:|---:|---:|---:|")
    for n in map(int, args.lengths.split(",")):
        ms = {name: median_ms(attention_case(n, dtype, backend, 9, 64), args.repeats)
              for name, dtype, backend in (("flash_bf16", torch.bfloat16, SDPBackend.FLASH_ATTENTION),
                                           ("flash_fp32", torch.float32, SDPBackend.FLASH_ATTENTION),
                                           ("math_bf16", torch.bfloat16, SDPBackend.MATH))}
        out["attention_ms"][n] = ms
        print(f"| {n} | {ms['flash_bf16']:.2f} | {ms['flash_fp32']:.2f} | {ms['math_bf16']:.2f} | "
              f"{ms['flash_bf16'] / ms['flash_fp32']:.2f}x |")
    vocab = 49152
    ms = {name: median_ms(cross_entropy_case(args.rows, vocab, ours), args.repeats // 2)
          for name, ours in (("torch_float", False), ("chattune", True))}
    out["cross_entropy_ms"] = ms
    print(f"\ncross-entropy forward + backward of ({args.rows}, {vocab}) bf16 logits (ms, median)")
    print("| torch, logits.float() | chattune.training.loss.cross_entropy | speed-up |")
    print("|---:|---:|---:|")
    print(f"| {ms['torch_float']:.1f} | {ms['chattune']:.1f} | {ms['torch_float'] / ms['chattune']:.2f}x |")
    lengths = [93, 194, 104, 112]  # a throughput.py step's conversations
    samples = [{"input_ids": torch.randint(0, vocab, (n,)).tolist(), "labels": torch.randint(0, vocab, (n,)).tolist()}
               for n in lengths]
    ms = {("flat" if flat else "mask"): median_ms(lambda: collate(samples, 0, packing=True, bins=[[0, 1, 2, 3]],
                                                                  flat=flat), 10 * args.repeats)
          for flat in (True, False)}
    out["collate_ms"] = ms
    print(f"\ncollation of one packed row of {len(lengths)} conversations ({sum(lengths)} tokens): "
          f"flat {ms['flat']:.2f} ms, 4D mask {ms['mask']:.2f} ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
