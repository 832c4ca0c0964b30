"""The worker of ``chattune compare``: one method, in its own process (``chattune compare
--worker METHOD``). It trains the method (resuming a stopped run), evaluates it on the test
split, and the first worker also evaluates the base model; each writes its row of the table
as ``OUT/<method>/result.json``. Why a process per method: see ``chattune.compare.command``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml

from chattune.compare.plan import method_config
from chattune.files import read_json, write_json


def work(out: Path, method: str, with_base: bool) -> int:
    """Train ``method`` (resuming a stopped run), evaluate it, write its result.json."""
    from chattune.compare.report import method_row

    record = yaml.safe_load((out / "compare.yaml").read_text())
    cfg = method_config(record, method, out)
    run_dir = out / method
    times = read_json(run_dir / "times.json") or {"train_wall_s": 0.0, "eval_wall_s": 0.0}
    if not (run_dir / "summary.json").is_file():
        start = time.perf_counter()
        _train(cfg, run_dir)
        times["train_wall_s"] += time.perf_counter() - start
        write_json(run_dir / "times.json", times)
    start = time.perf_counter()
    test, base = _evaluate(run_dir, with_base)
    times["eval_wall_s"] += time.perf_counter() - start
    write_json(run_dir / "times.json", times)
    if base is not None:
        write_json(out / "base.json", base)
    write_json(run_dir / "result.json", method_row(run_dir, method, times, test))
    return 0


def _train(cfg, run_dir: Path) -> None:
    from chattune.training.checkpoint import find_checkpoint
    from chattune.training.loop import train

    resume = (run_dir / "config.yaml").is_file()
    if resume and find_checkpoint(run_dir) is None:
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to continue
        resume = False
    train(cfg, resume=resume)


def _evaluate(run_dir: Path, with_base: bool) -> tuple[dict, dict | None]:
    """The test split (eval_test.json, reused when already written) and, when asked, the base
    model's test and validation numbers. A method's validation loss is not recomputed here:
    its run's last validation pass saw the same samples with the same weights."""
    from chattune.evaluate import HEADLINE, evaluate_run
    from chattune.generate.loaded import load_run

    run = None
    test = read_json(run_dir / "eval_test.json")
    if test is None or (with_base and "base" not in test):
        run = load_run(run_dir)
        # the headline decoding only: the shipped sampling, as users get it (greedy would double the time)
        test = evaluate_run(run, "test", include_base=with_base, decodings=(HEADLINE,))
        test.pop("answers")
        write_json(run_dir / "eval_test.json", test)
    if not with_base:
        return test, None
    return test, {"test": test["base"], "validation": _base_validation(run or load_run(run_dir))}


def _base_validation(run) -> dict | None:
    """The base model's loss on the validation samples that every run's validation passes use."""
    from chattune.data import prepare
    from chattune.training.passes import loss_on_samples
    from chattune.models.loading import autocast_dtype

    cfg = run.cfg
    samples = prepare(cfg.data, run.tokenizer).splits["validation"][: cfg.train.max_eval_samples]
    if not samples:
        return None
    device = next(run.model.parameters()).device
    with run.base() as base:  # as Trainer.validate computes it, with the method switched off
        return loss_on_samples(base, samples, run.tokenizer.pad_token_id, cfg.eval.batch_size, device,
                               autocast_dtype(cfg.train.precision, device))
