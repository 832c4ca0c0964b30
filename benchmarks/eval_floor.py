"""The floor under an evaluation's time on this machine: the work it did, at the machine's
measured matmul peak and memory bandwidth.

    .venv/bin/python benchmarks/eval_floor.py RUN RUN/eval-NAME [--wall SECONDS]

Reads the eval's own ``answers.jsonl`` and ``result.json`` (written by ``chattune eval``)
and counts:
- decode: every answer token after the first (which prefill chooses) runs every linear
  layer once (2 FLOPs a weight) and reads its row's cache, keys and values of every layer
  for the prompt and the answer so far;
- prefill: every (model, prompt) once, without the output projection (only the last
  token's logits are kept), plus causal attention;
- the reference-answer loss: every reference sample (prompt and answer) once per model,
  every linear layer and causal attention.
Matmul work is priced at the large-matmul peak (``matmul_peak.py``: a 1024^3 matmul, far
more efficient than the 32-row matrices of a decode step), cache reads at the read
bandwidth of a sum over a 1 GiB tensor. The engine decodes and prefills in the weights'
float32; the reference-answer loss runs under the run's autocast (bf16 where ``precision``
auto found bf16 instructions, as training did), so that phase is priced at that dtype's
peak. Only first turns are counted and LoRA's low-rank
terms, norms, sampling and Python are left out, so this is a bound no engine on this
machine beats: what an eval's time is compared with. Prints the work and the floor per
phase, and as the last line one JSON object (with ``--wall``, also wall / floor).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers.pytorch_utils import Conv1D

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_peak import matmul_flops  # noqa: E402

from chattune.data.questions import read_questions  # noqa: E402
from chattune.evaluate.run import _reference_samples  # noqa: E402
from chattune.generate.loaded import load_run  # noqa: E402
from chattune.models.loading import autocast_dtype  # noqa: E402


def read_bandwidth(gib: float = 1.0, seconds: float = 2.0) -> float:
    """Bytes per second read by ``sum`` over a tensor far larger than the caches."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x.sum()
        reps += 1
    return x.numel() * 4 * reps / (time.perf_counter() - start)


def model_shape(model) -> dict:
    """Weights of every linear layer (GPT-2's ``Conv1D`` too; the output projection apart), and
    cache bytes a position."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    weights = sum(m.weight.numel() for m in inner.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head)
    weights -= sum(p.numel() for n, p in inner.named_parameters() if "lora_" in n)  # LoRA's own matrices: left out
    c = inner.config
    layers, heads = c.num_hidden_layers, c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", heads) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return {"linear_weights": weights, "head_weights": head.weight.numel(), "layers": layers,
            "attention_width": heads * head_dim, "cache_bytes_per_position": 2 * layers * kv_heads * head_dim * 4}


def count(run, eval_dir: Path) -> dict:
    answers = [json.loads(line) for line in (eval_dir / "answers.jsonl").open()]
    result = json.loads((eval_dir / "result.json").read_text())
    first = [a for a in answers if a.get("turn", 0) == 0]
    prompt_len = {}
    for a in first:
        key = (a["prompt_id"], a["prompt"])
        if key not in prompt_len:
            prompt_len[key] = len(run.request([{"role": "user", "content": a["prompt"]}], max_new_tokens=1).prompt_ids)
    models = sorted({a["model"] for a in first})
    info = result["prompts"]
    samples = []
    if info.get("file"):
        qs = read_questions(info["file"], info["format"], "first", info.get("reference_model"), run.cfg.data)
        qs.select(info["used"] + sum(info.get("skipped", {}).values()))
        ids = {a["prompt_id"] for a in first}
        answered = {i for i, q in enumerate(qs.questions) if (q.raw_id if q.raw_id is not None else q.id) in ids}
        samples = [len(s["input_ids"]) for s in _reference_samples(run, qs, answered)]
    steps = [(prompt_len[(a["prompt_id"], a["prompt"])], max(a["tokens"] - 1, 0)) for a in first]  # the first token comes from prefill
    return {"answers": len(first), "models": models,
            "decode_steps": sum(s for _, s in steps),
            "positions_read": sum(n * s + s * (s + 1) // 2 for n, s in steps),  # prompt + answer so far, at each step
            "prompt_tokens": [n for n in prompt_len.values() for _ in models],
            "reference_tokens": [n for n in samples for _ in models]}


def floor(work: dict, shape: dict, flops: float, bandwidth: float, loss_flops: float | None = None) -> dict:
    linear = 2 * (shape["linear_weights"] + shape["head_weights"])  # FLOPs a token
    body = 2 * shape["linear_weights"]

    def causal(n: int) -> float:  # QK^T and AV over the positions before each token, all layers
        return 2 * 2 * shape["attention_width"] * shape["layers"] * n * (n + 1) / 2

    phases = {
        "decode_linear": work["decode_steps"] * linear / flops,
        "decode_cache_reads": work["positions_read"] * shape["cache_bytes_per_position"] / bandwidth,
        "prefill": sum(n * body + 2 * shape["head_weights"] + causal(n) for n in work["prompt_tokens"]) / flops,
        "reference_loss": sum(n * linear + causal(n) for n in work["reference_tokens"]) / (loss_flops or flops),
    }
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("eval_dir", help="the eval's output directory (answers.jsonl, result.json)")
    ap.add_argument("--wall", type=float, help="the eval's wall time in seconds, for wall / floor")
    args = ap.parse_args()
    run = load_run(args.run_dir)
    work = count(run, Path(args.eval_dir))
    shape = model_shape(run.model)
    flops, bandwidth = matmul_flops(torch.float32), read_bandwidth()
    loss_dtype = autocast_dtype(run.cfg.train.precision, torch.device("cpu"))  # what eval's loss runs under
    loss_flops = matmul_flops(loss_dtype) if loss_dtype is not None else flops
    phases = floor(work, shape, flops, bandwidth, loss_flops)
    phases = {k: round(v, 1) for k, v in phases.items()}
    total = round(sum(phases.values()), 1)
    print(f"{work['answers']} answers, {work['decode_steps']} decode-step tokens, {work['positions_read']:,} cache positions "
          f"read, {sum(work['prompt_tokens']):,} prompt tokens prefilled, {sum(work['reference_tokens']):,} "
          f"reference-loss tokens")
    print(f"machine: {flops / 1e9:.0f} GFLOP/s float32 matmul peak, {bandwidth / 1e9:.1f} GB/s read bandwidth"
          + (f"; the loss under {loss_dtype} autocast: {loss_flops / 1e9:.0f} GFLOP/s" if loss_dtype else ""))
    for k, v in phases.items():
        print(f"{k:20s} {v:8.1f} s")
    print(f"{'floor':20s} {total:8.1f} s" + (f"  (the eval took {args.wall:.0f} s: {args.wall / total:.2f}x)"
                                             if args.wall else ""))
    out = {"work": {k: (sum(v) if isinstance(v, list) and k != "models" else v) for k, v in work.items()},
           "model": shape, "gflops": round(flops / 1e9, 1),
           "loss_dtype": str(loss_dtype or torch.float32), "loss_gflops": round(loss_flops / 1e9, 1),
           "read_gb_s": round(bandwidth / 1e9, 2),
           "floor_s": phases, "floor_total_s": total}
    if args.wall:
        out["wall_s"], out["wall_over_floor"] = args.wall, round(args.wall / total, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
