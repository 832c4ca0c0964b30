"""Measured matmul peak of this machine in float32 and bfloat16 (the denominator for the
achieved-FLOP/s figures in throughput.py). Prints one JSON line."""

from __future__ import annotations

import json
import time

import torch


def matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def main() -> dict:
    out = {"threads": torch.get_num_threads(), "fp32_gflops": matmul_flops(torch.float32) / 1e9,
           "bf16_gflops": matmul_flops(torch.bfloat16) / 1e9}
    out["bf16_over_fp32"] = out["bf16_gflops"] / out["fp32_gflops"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
