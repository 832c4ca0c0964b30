"""``chattune export RUN OUT --format gguf``: a run as GGUF files for llama.cpp and Ollama.

LoRA, DoRA, IA3 and full fine-tuning are merged into the base weights and written as one
``model.gguf``; with ``--adapter-only`` a LoRA run is written as llama.cpp's adapter format
(``adapter.gguf``) beside the base model (``base.gguf``). Prompt tuning, prefix tuning and
bottleneck adapters change the computation itself, which a GGUF cannot express.

Everything is written into a temporary directory beside OUT and renamed to OUT at the
end, so a failed or interrupted export (a full disk, Ctrl-C) never leaves half a file.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import gguf
from tqdm.auto import tqdm

from chattune.errors import UserError
from chattune.generate.gguf_files import modelfile, readme
from chattune.generate.gguf_tensors import (
    QUANTS,
    QuantSummary,
    add_hparams,
    encode,
    gguf_arch,
    lora_tensors,
    model_tensors,
)
from chattune.generate.gguf_vocab import add_vocab, pre_tokenizer_name
from chattune.generate.loaded import LoadedRun, load_run
from chattune.methods import get_method
from chattune.training import rundir


def export_gguf(run_dir: str, out: str, quant: str = "f16", adapter_only: bool = False) -> str:
    """Write the run as GGUF (+ Modelfile, README.md) into the new directory ``out``; returns the summary."""
    if quant not in QUANTS:
        raise UserError(f"--quant must be one of {', '.join(QUANTS)}, not '{quant}'")
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not empty; choose a new directory")
    _check_method(get_method(rundir.read_config(Path(run_dir), finished=True).method.name), run_dir, adapter_only)
    run = load_run(run_dir)
    gguf_arch(run.model.config)
    pre_tokenizer_name(run.tokenizer)
    staging = _staging(out_dir)
    try:
        lines = _write(run, staging, quant, adapter_only, _ollama_name(run.run_dir), out_dir)
        os.replace(staging, out_dir)
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return f"wrote {out_dir}:\n" + "\n".join(lines)


def _check_method(method, run_dir: str, adapter_only: bool) -> None:
    """Refuse what GGUF cannot hold before any weights are loaded."""
    if method.merge is None:
        raise UserError(f"{method.name} changes the computation, not the weights, so GGUF cannot express it: chat "
                        f"with `chattune serve {run_dir}` or write a Hugging Face directory with `chattune export`")
    if adapter_only and method.name != "lora":
        raise UserError(f"--adapter-only writes llama.cpp LoRA adapters; a {method.name} run is exported merged "
                        "(drop --adapter-only)")


def _staging(out_dir: Path) -> Path:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    except OSError as e:
        raise UserError(f"cannot write to {out_dir.parent}: {e.strerror or e}") from None


def _ollama_name(run_dir: Path) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", run_dir.resolve().name.lower()).strip("-.") or "chattune"


def _write(run: LoadedRun, staging: Path, quant: str, adapter_only: bool, name: str, out_dir: Path) -> list[str]:
    template = run.cfg.data.template
    tok_dir = rundir.tokenizer_dir(run.run_dir)
    if adapter_only:
        from chattune.training.init_from import load_start_model

        base = load_start_model(run.cfg.model)  # what the adapter sits on (with --init-from: merged in)
        model_file, adapter_file = "base.gguf", "adapter.gguf"
        lines = [write_model(staging / model_file, base, run.tokenizer, tok_dir, template, quant, f"{name} base"),
                 _write_adapter(staging / adapter_file, run.model, quant, name)]
    else:
        model_file, adapter_file = "model.gguf", None
        merged = run.method.merge(run.model)
        lines = [write_model(staging / model_file, merged, run.tokenizer, tok_dir, template, quant, name)]
    (staging / "Modelfile").write_text(modelfile(model_file, run.tokenizer, template, adapter_file))
    (staging / "README.md").write_text(readme(name, model_file, "; ".join(lines), adapter_file))
    lora = f" --lora {out_dir / adapter_file}" if adapter_file else ""
    return lines + ["Modelfile, README.md", f"ollama create {name} -f {out_dir / 'Modelfile'}",
                    f"llama-server -m {out_dir / model_file}{lora} --jinja"]


def write_model(path: Path, model, tokenizer, tokenizer_dir: Path, template: str, quant: str, name: str) -> str:
    """One model's GGUF file (weights, hyperparameters, tokenizer, chat template); a summary line.

    Args:
        path: the file to write.
        model: a plain transformers causal LM (a method already merged in).
        tokenizer: its tokenizer, saved in ``tokenizer_dir`` (SpecialVocab reads the files there).
        template: the chat template answers are rendered with: "seed", "chat" or "auto".
        quant: one of ``QUANTS``.
        name: ``general.name``.
    """
    config = model.config
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf_arch(config)])
    writer.add_name(name)
    add_hparams(writer, config, quant)
    add_vocab(writer, tokenizer, tokenizer_dir, model.get_input_embeddings().weight.shape[0], template)
    return _finish(writer, path, model_tensors(model), quant, len(model.state_dict()))


def _write_adapter(path: Path, model, quant: str, name: str) -> str:
    alpha, tensors = lora_tensors(model)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf_arch(model.base_model.model.config)])
    writer.add_name(f"{name} LoRA")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    return _finish(writer, path, iter(tensors), quant, len(tensors))


def _finish(writer: gguf.GGUFWriter, path: Path, tensors, quant: str, total: int) -> str:
    """Encode every tensor (progress bar), check the disk has room, write; a one-line summary."""
    summary, size = QuantSummary(), 0
    for tname, w in tqdm(tensors, total=total, desc=f"{path.name}: {quant}", unit="tensor", leave=False):
        data, qtype = encode(tname, w, quant, summary)
        writer.add_tensor(tname, data, raw_dtype=qtype)
        size += data.nbytes
    free = shutil.disk_usage(path.parent).free
    if size > free:
        raise UserError(f"not enough disk space for {path.name}: needs {_mb(size)}, {_mb(free)} free")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    count = sum(summary.types.values())
    return f"{path.name} ({_mb(path.stat().st_size)}, {count} tensors: {summary})"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
