"""SFT throughput on one machine: the seed recipe vs TRL vs chattune, same model, data and steps.

    python benchmarks/throughput.py                  # GPT-2 124M (random weights) and smollm2-135m
    python benchmarks/throughput.py --quick          # GPT-2 only, 3 steps: about 3 minutes
    python benchmarks/throughput.py --gpu            # on CUDA, when there is one

Three systems, each in its own process (so each has its own peak RSS), train LoRA (r=8,
alpha=16, dropout 0.05, the model's default targets) for the same number of optimiser steps
on the same conversations (first user->assistant pair, seed text format):

  (a) seed      HF Trainer + DataCollatorForLanguageModeling, every text padded to 512, batch 4
  (b) trl       TRL SFTTrainer + PEFT, BFD packing (padding-free), completion-only loss, bf16
  (c) chattune  ``python -m chattune.cli train --method lora`` (packing, bf16, answer-only loss)

Same steps, same tokens: the run trains on 4 x steps conversations. The seed covers 4 of them
per step; (b) and (c) pack them best-fit-decreasing into one row per step, of a capacity chosen
so that the whole set fills exactly ``steps`` rows. So every system sees the same
conversations once, and a step holds ~4 conversations for all three.

The primary figure is conversation tokens/s (non-pad tokens, steady state: the first step,
which pays one-time set-up, is excluded). Validation loss is the answer-token loss of each saved
adapter on the same held-out conversations, computed by one function (``_systems.answer_loss``).
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _systems  # noqa: E402
from _data import (DATA, REPO, count_params, first_pairs, model_dir, pack_length, select,  # noqa: E402,F401
                   write_messages)
from _report import SYSTEMS, report, summary_of  # noqa: E402

MODELS = ["gpt2", "smollm2-135m"]
LORA = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
LR = 2e-4  # TRL's and chattune's LoRA learning rate; the seed keeps its own 2e-5
# TRL at its fastest valid settings here (see benchmarks/README.md): bf16 autocast, BFD packing
# with padding-free position_ids (transformers builds the block-diagonal mask from them under
# sdpa), completion-only loss; gradient checkpointing (SFTConfig's default) off, as it only
# trades speed for memory. TRL and chattune share one learning-rate schedule (cosine, no
# warmup), so that the validation losses compare the implementations, not two schedules: with
# their own defaults (TRL linear without warmup, chattune 5% warmup + cosine) TRL's 20 steps
# had ~10% more learning-rate area.
SCHEDULE = {"lr_scheduler_type": "cosine", "warmup_steps": 0}
TRL_SETTINGS = {"packing": True, "packing_strategy": "bfd", "completion_only_loss": True, "bf16": True,
                "gradient_checkpointing": False, "learning_rate": LR, "per_device_train_batch_size": 1, **SCHEDULE}
GEN_PROMPT = "What's the capital of Italy?"


# -- running the systems ------------------------------------------------------------------------
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}
# The same for all three systems. With OpenMP's default spin-waiting, a CPU shared with other
# processes stalls every parallel op until a descheduled thread returns: here that made all
# three systems 2-5x slower and their ratios mostly noise; PASSIVE costs ~2% on an idle CPU.
# An OMP_WAIT_POLICY already in the environment, or --env, wins.
BENCH_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def parse_env(items: list[str]) -> dict:
    pairs = [item.partition("=") for item in items]
    bad = [k for k, eq, _ in pairs if not eq or not k]
    if bad:
        sys.exit(f"throughput: --env wants NAME=VALUE, got {bad[0]!r}")
    return {k: v for k, _, v in pairs}


def child_env(gpu: bool) -> dict:
    env = dict(os.environ, **CHILD_ENV)
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU figures stay CPU figures on a machine with a GPU
    return env


def run_child(cmd: list[str], log: Path, gpu: bool) -> float:
    """Run ``cmd`` to completion and return its own peak RSS in MB; exit with its log tail on failure."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(gpu), cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone, not the max over all children
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        sys.exit(f"throughput: {' '.join(cmd[1:4])} failed (exit {proc.returncode}); end of {log}:\n{tail}")
    return usage.ru_maxrss / 1024  # Linux reports KiB


def steady(tokens: list[int], loss_tokens: list[int], seconds: list[float]) -> dict:
    """Totals over all steps; rates over steps 2.. (step 1 pays one-time set-up) when there are several."""
    skip = 1 if len(seconds) > 1 else 0
    t = sum(seconds[skip:])
    return {"steps": len(seconds), "tokens": sum(tokens), "loss_tokens": sum(loss_tokens),
            "tokens_per_s": sum(tokens[skip:]) / t, "loss_tokens_per_s": sum(loss_tokens[skip:]) / t,
            "first_step_s": seconds[0], "step_s": t / len(seconds[skip:]),
            "steady": [sum(tokens[skip:]), sum(loss_tokens[skip:]), t]}


def pooled(runs: list[dict]) -> dict:
    """One system's figures over its runs (one per training seed): rates over all their steady
    steps, the first run's totals, the highest peak memory."""
    tokens, loss_tokens, seconds = (sum(r["steady"][i] for r in runs) for i in range(3))
    return {**runs[0], "runs": len(runs), "tokens_per_s": tokens / seconds, "loss_tokens_per_s": loss_tokens / seconds,
            "step_s": sum(r["step_s"] for r in runs) / len(runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "peak_gpu_mb": None if runs[0]["peak_gpu_mb"] is None else max(r["peak_gpu_mb"] for r in runs)}


def run_hf_system(system: str, spec: dict, work: Path) -> dict:
    out = work / f"{system}-{spec['seed']}.json"
    spec_path = work / f"spec-{system}-{spec['seed']}.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    rss = run_child([sys.executable, str(Path(_systems.__file__)), system, str(spec_path), str(out)],
                    work / f"{system}-{spec['seed']}.log", spec["gpu"])
    r = json.loads(out.read_text())
    ends = [r["t0"], *r["step_end"]]
    figures = steady(r["tokens"], r["loss_tokens"], [b - a for a, b in zip(ends, ends[1:])])
    return {**figures, "peak_rss_mb": rss, "precision": r["precision"], "final_train_loss": r["train_losses"][-1],
            "threads": r["threads"], "device": r["device"], "peak_gpu_mb": r["peak_gpu_mb"]}


def chattune_cmd(spec: dict, run_dir: Path, overrides: list[str]) -> list[str]:
    sets = ["data.turns=first", "data.val_ratio=0", "data.test_ratio=0", "train.log_every=1",
            "train.warmup_ratio=0",  # SCHEDULE
            f"train.save_every={spec['steps']}", f"method.lora.r={spec['lora_r']}",
            f"method.lora.alpha={spec['lora_alpha']}", f"method.lora.dropout={spec['lora_dropout']}", *overrides]
    cmd = [sys.executable, "-m", "chattune.cli", "train", "--model", spec["model_dir"], "--dataset", spec["train_file"],
           "--format", "messages", "--method", "lora", "--max-steps", str(spec["steps"]), "--batch-size", "1",
           "--max-length", str(spec["pack_length"]), "--lr", str(LR), "--seed", str(spec["seed"]),
           "--output-dir", str(run_dir), "--json"]
    return cmd + [a for s in sets for a in ("--set", s)]


def run_chattune(spec: dict, work: Path, overrides: list[str]) -> dict:
    run_dir = Path(spec["adapters"]["chattune"]).parent
    shutil.rmtree(run_dir, ignore_errors=True)  # chattune refuses to overwrite a run; a reused --work-dir holds one
    rss = run_child(chattune_cmd(spec, run_dir, overrides), work / f"chattune-{spec['seed']}.log", spec["gpu"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_s" in r]  # log_every=1: one window per step
    tokens, loss_tokens, seconds, seen, seen_loss = [], [], [], 0, 0
    for r in records:
        tokens.append(r["tokens"] - seen)
        loss_tokens.append(r["loss_tokens"] - seen_loss)
        seconds.append(tokens[-1] / r["tokens_per_s"])
        seen, seen_loss = r["tokens"], r["loss_tokens"]
    info = json.loads((run_dir / "run_info.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**steady(tokens, loss_tokens, seconds), "peak_rss_mb": rss, "precision": {"bfloat16": "bf16", "float32": "fp32"}.get(info["precision"], info["precision"]),
            "final_train_loss": summary["final_train_loss"], "threads": None, "device": None,
            "peak_gpu_mb": summary["peak_memory_mb"] if spec["gpu"] else None}


# -- one model ----------------------------------------------------------------------------------
def bench_model(name: str, directory: Path, args, work: Path, peaks: dict) -> dict:
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(directory)
    data = select(first_pairs(args.data), tok, args.per_step * args.steps, args.val, args.seed)
    write_messages(work / "train.jsonl", data["train"])
    write_messages(work / "val.jsonl", data["val"])
    spec = {"model_dir": str(directory), "train_file": str(work / "train.jsonl"), "val_file": str(work / "val.jsonl"),
            "steps": args.steps, "pack_length": pack_length(data["train_lengths"], args.steps), "seed": args.seed,
            "gpu": args.gpu, "work": str(work), "trl": {**TRL_SETTINGS, **parse_sets(args.trl_set)},
            "gen_tokens": args.gen_tokens, "gen_prompt": GEN_PROMPT, **LORA}
    # The seed recipe trains once (its own lr; far behind either way); TRL and chattune once per
    # training seed (--seeds), so that their validation losses can be told from seed noise.
    seeds = {system: [args.seed + i for i in range(1 if system == "seed" else args.seeds)] for system in SYSTEMS}
    adapters = {(system, seed): str(work / (f"chattune-run-{seed}/adapter" if system == "chattune"
                                            else f"{system}-adapter-{seed}"))
                for system in SYSTEMS for seed in seeds[system]}
    runs = {system: [] for system in SYSTEMS}
    for system in SYSTEMS:
        for seed in seeds[system]:
            log(f"{name}: training {system} for {args.steps} steps (seed {seed}) ...")
            start = time.perf_counter()
            run_spec = {**spec, "seed": seed, "adapters": {system: adapters[system, seed]}}
            runs[system].append(run_chattune(run_spec, work, args.chattune_set) if system == "chattune"
                                else run_hf_system(system, run_spec, work))
            log(f"{name}: {system} done in {time.perf_counter() - start:.0f}s, "
                f"{runs[system][-1]['tokens_per_s']:.0f} tokens/s")
    systems = {system: pooled(r) for system, r in runs.items()}
    log(f"{name}: validation loss{' and generation speed' if args.gen_tokens else ''} ...")
    spec["adapters"] = {f"{system}@{seed}": path for (system, seed), path in adapters.items()}
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    run_child([sys.executable, str(Path(_systems.__file__)), "evaluate", str(work / "spec.json"), str(work / "eval.json")],
              work / "evaluate.log", args.gpu)
    evaluation = json.loads((work / "eval.json").read_text())
    params = count_params(directory)
    for system, s in systems.items():
        s["val_losses"] = [evaluation["val_loss"][f"{system}@{seed}"] for seed in seeds[system]]
        s["val_loss"] = statistics.fmean(s["val_losses"])
        s["seconds_per_epoch"] = data["epoch_tokens"] / s["tokens_per_s"]
        # LoRA: forward 2 and input-gradients 2 FLOPs per parameter per token; no weight gradients
        s["gflops"] = 4 * params * s["tokens_per_s"] / 1e9
        s["peak_share"] = s["gflops"] * 1e9 / peaks[s["precision"]] if s["precision"] in peaks else None
    ratio = {other: systems["chattune"]["tokens_per_s"] / systems[other]["tokens_per_s"] for other in ("seed", "trl")}
    return {"model": name, "params": params, "steps": args.steps, "seeds": seeds["trl"], "conversations": len(data["train"]),
            "pack_length": spec["pack_length"], "val_conversations": len(data["val"]),
            "val_answer_tokens": evaluation["val_answer_tokens"], "epoch_conversations": data["epoch_conversations"],
            "epoch_tokens": data["epoch_tokens"], "systems": systems, "base_val_loss": evaluation["val_loss"]["base"],
            "vs_seed": ratio["seed"], "vs_trl": ratio["trl"], "trl_settings": spec["trl"],
            "chattune_overrides": args.chattune_set, "generation": evaluation.get("generation")}


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)  # numbers, true/false, lists
        except json.JSONDecodeError:
            out[key] = value
    return out


# -- progress and machine ------------------------------------------------------------------------------------
def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def matmul_peaks(gpu: bool) -> dict:
    """FLOP/s of a large matmul per precision: the denominator of the '% peak' column."""
    if not gpu:  # in a child, so it runs under the same environment as the systems
        proc = subprocess.run([sys.executable, str(Path(__file__).parent / "matmul_peak.py")], env=child_env(False),
                              capture_output=True, text=True, check=True)
        peak = json.loads(proc.stdout.strip().splitlines()[-1])
        return {"fp32": peak["fp32_gflops"] * 1e9, "bf16": peak["bf16_gflops"] * 1e9}
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a, b = torch.randn(8192, 8192, device="cuda", dtype=dtype), torch.randn(8192, 8192, device="cuda", dtype=dtype)
        a @ b
        torch.cuda.synchronize()
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            a @ b
            torch.cuda.synchronize()
            reps += 1
        out[name] = 2 * 8192**3 * reps / (time.perf_counter() - start)
    return out


def machine_info(gpu: bool) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    return {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_start": round(os.getloadavg()[0], 2)}


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", choices=MODELS,
                   help="model to measure (repeatable; default: both, --quick: gpt2)")
    p.add_argument("--model-dir", type=Path, help="a local HF model directory instead of --model (tests use a tiny one)")
    p.add_argument("--data", type=Path, default=DATA, help="conversations in messages format (.jsonl)")
    p.add_argument("--quick", action="store_true", help="GPT-2 only, 3 steps, 4 validation conversations, 8 generated tokens: ~3 minutes")
    p.add_argument("--steps", type=int, help="optimiser steps per system (default 20; --quick 3)")
    p.add_argument("--per-step", type=int, default=4,
                   help="conversations per optimiser step, packed into one row by TRL and chattune (default 4; "
                        "the GPU suite packs rows of 4-8k tokens); the seed recipe keeps its batches of 4")
    p.add_argument("--val", type=int, help="held-out conversations for the validation loss (default 48; --quick 4)")
    p.add_argument("--gen-tokens", type=int, help="new tokens per generation timing; 0 skips it (default 32; --quick 8)")
    p.add_argument("--gpu", action="store_true", help="run on CUDA (the seed then uses fp16, as its notebook did)")
    p.add_argument("--seed", type=int, default=0, help="data selection seed, and the first training seed")
    p.add_argument("--seeds", type=int, default=1,
                   help="train TRL and chattune with this many seeds (--seed, --seed+1, ...): rates pooled over "
                        "all runs, validation loss as mean and spread (default 1)")
    p.add_argument("--work-dir", type=Path, help="keep logs, specs and adapters here (default: a temp dir)")
    p.add_argument("--trl-set", action="append", default=[], metavar="KEY=VALUE", help="override an SFTConfig field")
    p.add_argument("--chattune-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra chattune --set override (e.g. train.precision=fp32)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for all three systems alike (default OMP_WAIT_POLICY=PASSIVE; "
                        "OMP_WAIT_POLICY=ACTIVE measures OpenMP's spin-waiting)")
    args = p.parse_args(argv)
    args.model = args.model or (MODELS[:1] if args.quick else MODELS)
    args.steps = args.steps or (3 if args.quick else 20)
    args.val = args.val if args.val is not None else (4 if args.quick else 48)
    args.gen_tokens = args.gen_tokens if args.gen_tokens is not None else (8 if args.quick else 32)
    if args.steps < 1 or args.val < 1 or args.seeds < 1:
        p.error("--steps, --val and --seeds must be positive")
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu: no CUDA device is visible")
    if not args.data.is_file():
        p.error(f"--data {args.data}: no such file (the shared data lives in ../shared/data)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # lengths above the model's limit are expected while selecting
    bench_env = {k: os.environ.get(k, v) for k, v in BENCH_ENV.items()} | parse_env(args.env)
    CHILD_ENV.update(bench_env)
    machine = machine_info(args.gpu)
    machine["env"] = " ".join(f"{k}={v}" for k, v in bench_env.items())
    log(f"measuring the matmul peak on {machine['device']} ...")
    peaks = matmul_peaks(args.gpu)
    machine.update({f"{k}_matmul_gflops": v / 1e9 for k, v in peaks.items()})
    models = ([(args.model_dir.name, args.model_dir)] if args.model_dir
              else [(m, model_dir(m)) for m in args.model])
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="chattune-bench-"))
    results = {}
    for i, (name, directory) in enumerate(models):
        if i:  # generation speed once per run is enough in --quick
            args.gen_tokens = 0 if args.quick else args.gen_tokens
        results[name] = bench_model(name, directory, args, work / name.replace("/", "_"), peaks)
        print(report(results[name], machine) + "\n", flush=True)
    machine["load_average_end"] = round(os.getloadavg()[0], 2)
    first = next(iter(results.values()))
    out = {"model": first["model"], **{k: v for k, v in summary_of(first).items()
                                       if k in ("vs_seed", "vs_trl", "peak_rss_mb", "val_loss")},
           "steps": args.steps, "seeds": args.seeds, "quick": args.quick, "env": bench_env, "machine": machine,
           "torch_threads": machine["torch_threads"], "work_dir": str(work), "models": {name: summary_of(r) for name, r in results.items()}}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
