"""``chattune.evaluate`` and ``chattune.export``: what ``chattune eval`` and ``chattune
export`` do, returned as objects instead of printed."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from chattune.errors import UserError

if TYPE_CHECKING:
    from chattune.api.chatbot import Chatbot

METRIC_KEYS = ("answers", "eos_share", "new_turn_share", "cut_share", "rep4", "loop_share", "distinct_2",
               "median_length", "length_ratio", "rouge_l")


def to_dataframe(rows: list[dict]):
    """``pandas.DataFrame(rows)``; pandas is an optional extra (``pip install 'chattune[pandas]'``)."""
    try:
        import pandas
    except ImportError:
        raise UserError("to_dataframe needs pandas: pip install 'chattune[pandas]'") from None
    return pandas.DataFrame(rows)


@dataclass
class EvalResult:
    """One evaluation: the numbers ``result.json`` holds, the answers, and where both are.

    Attributes:
        data: everything ``result.json`` holds (``tuned``/``base`` metrics per decoding,
            losses, ``paired``, ``prompts``, ``settings``, ``output_dir``).
        answers: every answer (prompt, model, decoding, text, finish reason, tokens).
        output_dir: where ``answers.jsonl`` and ``result.json`` were written.
    """

    data: dict
    answers: list[dict] = field(repr=False)
    output_dir: Path

    def table(self) -> str:
        """The table ``chattune eval`` prints."""
        from chattune.evaluate.report import eval_table

        return eval_table(self.data)

    def __str__(self) -> str:
        return self.table()

    def rows(self) -> list[dict]:
        """One row per (model, decoding): the answer metrics, plus the reference-answer loss."""
        out = []
        for model in ("tuned", "base"):
            cell = self.data.get(model, {})
            for decoding in self.data["settings"]["decodings"]:
                if decoding in cell:
                    out.append({"model": model, "decoding": decoding, "loss": cell.get("loss"),
                                **{k: cell[decoding].get(k) for k in METRIC_KEYS}})
        return out

    def to_dataframe(self, answers: bool = False):
        """``rows()`` (or, with ``answers``, every answer) as a pandas DataFrame.

        Raises:
            UserError: pandas is not installed.
        """
        return to_dataframe(self.answers if answers else self.rows())


def _loaded(run: str | os.PathLike | Chatbot):
    from chattune.api.chatbot import Chatbot
    from chattune.generate.loaded import load_run

    if isinstance(run, Chatbot):
        if run.run_dir is None:
            raise UserError("evaluate needs a trained run, not a plain model")
        return run.run
    return load_run(run)


def evaluate(run: str | os.PathLike | Chatbot, prompts: str | None = None, *, split: str = "test",
             format: str = "auto", turns: str = "first", reference_model: str | None = None,  # noqa: A002
             num_prompts: int | None = None, max_samples: int | None = None, max_new_tokens: int | None = None,
             decodings: str | Sequence[str] = ("sampled", "greedy"), seed: int = 0, max_batch: int = 32,
             base: bool = True, output_dir: str | Path | None = None, export_answers: str | None = None,
             judge_url: str | None = None, judge_model: str | None = None,
             judge_key_env: str | None = None) -> EvalResult:
    """Evaluate a run against its base model, exactly as ``chattune eval`` does.

    Args:
        run: a run directory, a ``Run``, or a ``Chatbot`` of a run (not reloaded).
        prompts: a prompt file (MT-Bench, Arena-Hard, or any row format ``chattune data``
            reads); default: the run's own held-out ``split``.
        split: without ``prompts``: train, validation or test.
        format: the prompt file's format (auto, mtbench, arena-hard, arena, messages, ...).
        turns: ``first``, or ``all`` to also ask a question's second turn.
        reference_model: whose answers are the references (Arena-Hard: gpt-4-0314).
        num_prompts: prompts to answer (default: the run's ``eval.num_generate``).
        max_samples: without ``prompts``: a cap on the split's samples for the loss.
        max_new_tokens: the budget per answer (default: ``eval.max_new_tokens``).
        decodings: ``sampled`` (the shipped decoding, the headline) and/or ``greedy``,
            as a list or a comma-separated string.
        seed: the sampling seed (each prompt's is derived from it and the prompt's id).
        max_batch: answers decoded at once.
        base: also answer with the base model (the method switched off).
        output_dir: where answers and ``result.json`` go (default ``RUN/eval-NAME``).
        export_answers: also write answer files for a benchmark's judge (mtbench,
            arena-hard, alpaca-eval).
        judge_url: an OpenAI-compatible endpoint for a pairwise LLM judge.
        judge_model: the judge's model name.
        judge_key_env: the environment variable holding the judge's API key.

    Returns:
        The ``EvalResult``; ``str(result)`` is the CLI's table.

    Raises:
        UserError: a mistake the user can fix, with the message the CLI prints.
    """
    from chattune.evaluate import evaluate_run
    from chattune.evaluate.answers import export_answers as write_exports, write_answers

    loaded = _loaded(run)
    run_dir = Path(loaded.run_dir)
    name = Path(prompts).stem if prompts else split
    out = Path(output_dir or run_dir / f"eval-{name}")
    out.mkdir(parents=True, exist_ok=True)
    judge = None
    if judge_url or judge_model:
        from chattune.evaluate.judge import Judge

        if not (judge_url and judge_model) or not base:
            raise UserError("the judge needs --judge-url and --judge-model, and the base answers (no --no-base)")
        judge = Judge(judge_url, judge_model, judge_key_env, out / "judge_cache.jsonl")
    if isinstance(decodings, str):
        decodings = decodings.split(",")
    result = evaluate_run(loaded, split, prompts=prompts, fmt=format, turns=turns, reference_model=reference_model,
                          num_prompts=num_prompts, max_samples=max_samples, max_new_tokens=max_new_tokens,
                          include_base=base, decodings=tuple(d.strip() for d in decodings), seed=seed,
                          max_batch=max_batch, judge=judge)
    answers = result.pop("answers")
    write_answers(out, answers)
    if export_answers:
        result["exports"] = [str(p) for p in write_exports(out, answers, export_answers, run_dir.resolve().name,
                                                           result["prompts"]["id_key"], result["settings"]["headline"])]
    result["output_dir"] = str(out)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return EvalResult(result, answers, out)


@dataclass
class Exported:
    """What ``chattune.export`` wrote.

    Attributes:
        path: the output directory.
        message: what was written and how to load it (what the CLI prints).
    """

    path: Path
    message: str

    def __str__(self) -> str:
        return self.message


def export(run: str | os.PathLike, out: str | Path, *, format: str = "hf", quant: str | None = None,  # noqa: A002
           adapter_only: bool = False) -> Exported:
    """Write a run as a standalone model directory, as ``chattune export`` does.

    ``hf``: LoRA, DoRA, IA3 and full fine-tuning become plain weights
    (``AutoModelForCausalLM.from_pretrained(out)``); prompt, prefix and adapter runs are
    written as the base model plus the method's files, with the lines that load them.
    ``gguf``: a GGUF file (and an Ollama Modelfile) for llama.cpp and Ollama.

    Args:
        run: a run directory or ``Run``.
        out: a new (or empty) directory.
        format: ``hf`` or ``gguf``.
        quant: GGUF precision: f32, f16 (default), bf16, q8_0, q4_0.
        adapter_only: GGUF: LoRA as a llama.cpp adapter beside ``base.gguf``.

    Raises:
        UserError: ``out`` is not empty, ``run`` is not a finished run, or options that
            do not apply to ``format``.
    """
    if format == "gguf":
        from chattune.generate.gguf_export import export_gguf

        return Exported(Path(out), export_gguf(str(Path(run)), str(out), quant or "f16", adapter_only))
    if quant or adapter_only:
        raise UserError("--quant and --adapter-only apply to --format gguf")
    if format != "hf":
        raise UserError(f"export format must be hf or gguf, not '{format}'")
    from chattune.generate.export import export as write_export

    return Exported(Path(out), write_export(str(Path(run)), str(out)))
