"""DPO and KTO speed and memory on one machine: chattune vs TRL's DPOTrainer / KTOTrainer,
same model, examples, LoRA and steps.

    python benchmarks/preference.py                 # smollm2-135m, Arena-Hard pairs, 20 steps of 4 pairs
    python benchmarks/preference.py --quick         # 3 steps of 2 pairs, answers cut to 256 tokens
    python benchmarks/preference.py --objective kto # KTO: each step the 8 answers of 4 pairs

The pairs are Arena-Hard v0.1's (../shared/data/arena_hard_v0.1.jsonl): gpt-4-0314's answer
chosen over gpt-3.5-turbo-0125's, selected by chattune's pair pipeline (training split),
first ``steps x batch`` pairs. Both systems train LoRA (r=8, alpha=16, dropout 0.05 (both
switch dropout off for DPO), the model's default targets), DPO beta 0.1, the same learning
rate and cosine schedule without warmup, the same precision (bf16 autocast where the CPU has
bf16 instructions, float32 elsewhere: ``chattune.models.loading.autocast_dtype("auto")``), for the same number of optimiser
steps of ``batch`` pairs each, in their own process (each its own peak RSS):

  trl       DPOTrainer + PEFT; its reference is the adapter switched off, one more forward per step
            (TRL's default; ``--trl-precompute`` makes it precompute the reference log-probs first)
  chattune  ``chattune train --objective dpo --no-packing``: the same pairs per step, padded rows
  packed    ``chattune train --objective dpo`` (packing, the default): the same pairs, flat rows

Tokens are the pairs' non-padding tokens (prompt + answer, chosen and rejected). tokens/s
counts every step but the first (one-time set-up) and, for chattune, adds its one reference
pass to the time: the work TRL does inside its steps. The last line is one JSON object with
``vs_trl`` (chattune packed tokens/s over TRL's) and ``peak_rss_mb`` per system.

KTO (``--objective kto``) trains on the same pairs unpaired, as TRL's unpaired format
``{prompt, completion, label}``: each step the ``batch`` pairs' chosen answers (desirable)
then their rejected ones (undesirable), ``2 x batch`` rows a step, fed in file order to both
(``--format unpaired``; TRL's sequential sampler). Every answer is scored with a mismatched
one (another prompt's answer) for the reference point z0: chattune's mismatched batch, TRL's
KL rows, each scored by a forward without gradient, both counted in tokens. TRL's reference is again the adapter switched off. The
JSON line then has ``vs_trl_kto`` and ``rss_vs_trl_kto`` (packed chattune over TRL) instead of
``vs_trl``/``rss_vs_trl``. The TRL side is ``benchmarks/_pref_trl.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _pref_trl import BETA, LORA, LR, REPO, run_trl_dpo, run_trl_kto  # noqa: E402

SHARED = next((p for p in (REPO.parent / "shared", Path("/work/shared")) if p.is_dir()), REPO.parent / "shared")
DATA = SHARED / "data" / "arena_hard_v0.1.jsonl"


def select_pairs(data: Path, chosen: str, rejected: str, n: int) -> list[dict]:
    """The first ``n`` training pairs, as {prompt, chosen, rejected} strings (first turn)."""
    sys.path.insert(0, str(REPO / "src"))
    from chattune.data import DataConfig
    from chattune.data.pairs import load_pairs

    pairs = [p for p in load_pairs(DataConfig(dataset=str(data), chosen_model=chosen, rejected_model=rejected)).samples
             if p["split"] == "train"][:n]
    if len(pairs) < n:
        sys.exit(f"preference: only {len(pairs)} training pairs; lower --steps or --batch")
    return [{"id": p["id"], "prompt": p["chosen"][0]["content"], "chosen": p["chosen"][1]["content"],
             "rejected": p["rejected"][1]["content"]} for p in pairs]


def unpaired_rows(pairs: list[dict], batch: int) -> list[dict]:
    """KTO's rows: per step of ``batch`` pairs, their chosen answers then their rejected ones."""
    rows = []
    for start in range(0, len(pairs), batch):
        step = pairs[start:start + batch]
        rows += [{"id": f"{p['id']}:{side}", "prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                 for side in ("chosen", "rejected") for p in step]
    return rows


def run_chattune(spec: dict, packing: bool) -> dict:
    out = Path(spec["work"]) / ("packed" if packing else "chattune")
    fmt = "unpaired" if spec["objective"] == "kto" else "pairs"
    cmd = [sys.executable, "-m", "chattune.cli", "train", "--objective", spec["objective"], "--method", "lora",
           "--model", spec["model"], "--dataset", spec["rows"], "--format", fmt, "--output-dir", str(out),
           "--batch-size", str(spec["rows_per_step"]), "--max-length", str(spec["max_length"]), "--lr", str(LR),
           "--precision", "auto", "--packing" if packing else "--no-packing", "--json",
           "--set", "data.val_ratio=0", "--set", "data.test_ratio=0", "--set", "data.dedup=false",
           "--set", "train.warmup_ratio=0", "--set", "train.log_every=1", "--set", f"train.beta={BETA}",
           "--set", f"method.lora.r={LORA['r']}", "--set", f"method.lora.alpha={LORA['alpha']}",
           "--set", f"method.lora.dropout={LORA['dropout']}", "--set", f"train.save_every={10**6}"]
    # the same rows: every row once (the token budget ends a packed run when all are seen)
    cmd += ["--max-tokens", str(spec["tokens"])] if packing else ["--max-steps", str(spec["steps"])]
    t0 = time.perf_counter()
    env = {**_env(), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.exit(f"preference: chattune failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    ref_s = sum(m.get("reference_seconds", 0.0) for m in lines)
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + steps, steps)]
    seconds = [m["step_seconds"] for m in steps]
    return {"tokens": tokens, "seconds": seconds, "reference_seconds": ref_s, "losses": [m["loss"] for m in steps],
            "peak_rss_mb": summary["peak_memory_mb"], "wall_s": time.perf_counter() - t0}


def _env() -> dict:
    import os

    return dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def rate(r: dict) -> float:
    """Tokens/s over every step but the first, plus chattune's one reference pass."""
    tokens, seconds = sum(r["tokens"][1:]), sum(r["seconds"][1:])
    share = tokens / max(sum(r["tokens"]), 1)  # the reference pass covers all steps' pairs
    return tokens / max(seconds + share * r["reference_seconds"], 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objective", choices=["dpo", "kto"], default="dpo")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--chosen-model", default="gpt-4-0314")
    ap.add_argument("--rejected-model", default="gpt-3.5-turbo-0125")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4, help="pairs per optimiser step")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per conversation (prompt + one answer)")
    ap.add_argument("--quick", action="store_true", help="3 steps of 2 pairs, --max-length 256")
    ap.add_argument("--trl-precompute", action="store_true", help="TRL precomputes reference log-probs too")
    ap.add_argument("--work-dir", help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        spec = json.loads(Path(a.child[0]).read_text())
        run_trl = run_trl_kto if spec["objective"] == "kto" else run_trl_dpo
        Path(a.child[1]).write_text(json.dumps(run_trl(spec)))
        return
    if a.quick:
        a.steps, a.batch, a.max_length = 3, 2, 256
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="chattune-pref-"))
    work.mkdir(parents=True, exist_ok=True)
    pairs = select_pairs(Path(a.data), a.chosen_model, a.rejected_model, a.steps * a.batch)
    kto = a.objective == "kto"
    rows = unpaired_rows(pairs, a.batch) if kto else pairs
    (work / "rows.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    spec = {"objective": a.objective, "model": a.model, "rows": str(work / "rows.jsonl"), "work": str(work),
            "steps": a.steps, "rows_per_step": 2 * a.batch if kto else a.batch, "max_length": a.max_length,
            "trl_precompute": a.trl_precompute}
    results = {"chattune": run_chattune(spec, packing=False)}
    spec["tokens"] = sum(results["chattune"]["tokens"])  # the packed run sees exactly these pairs' tokens
    results["packed"] = run_chattune(spec, packing=True)
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--child", str(work / "spec.json"), str(work / "trl.json")],
                          capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        sys.exit(f"preference: TRL failed:\n{proc.stderr[-3000:]}")
    results["trl"] = json.loads((work / "trl.json").read_text())
    print(f"{'system':10s}{'steps':>7s}{'tokens':>9s}{'tokens/s':>10s}{'ref s':>8s}{'peak RSS MB':>13s}"
          f"{'loss 1':>9s}{'loss N':>9s}")
    for name, r in results.items():
        print(f"{name:10s}{len(r['seconds']):7d}{sum(r['tokens']):9d}{rate(r):10.0f}{r['reference_seconds']:8.1f}"
              f"{r['peak_rss_mb']:13.0f}{r['losses'][0]:9.4f}{r['losses'][-1]:9.4f}")
    suffix = "_kto" if kto else ""
    print(json.dumps({"objective": a.objective, "model": a.model, "steps": a.steps, "pairs_per_step": a.batch,
                      "rows_per_step": spec["rows_per_step"], "max_length": a.max_length,
                      "trl_precompute": a.trl_precompute, "tokens_per_s": {k: rate(r) for k, r in results.items()},
                      f"vs_trl{suffix}": rate(results["packed"]) / rate(results["trl"]),
                      f"vs_trl{suffix}_same_batches": rate(results["chattune"]) / rate(results["trl"]),
                      f"rss_vs_trl{suffix}": results["packed"]["peak_rss_mb"] / results["trl"]["peak_rss_mb"],
                      "peak_rss_mb": {k: r["peak_rss_mb"] for k, r in results.items()},
                      "step0_loss": {k: r["losses"][0] for k, r in results.items()},
                      "final_loss": {k: r["losses"][-1] for k, r in results.items()}}))


if __name__ == "__main__":
    main()
