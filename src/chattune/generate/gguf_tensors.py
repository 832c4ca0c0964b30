"""Model weights as GGUF tensors: names, layouts, hyperparameters and precision.

The ``gguf`` package (llama.cpp's own Python library) names the tensors
(``get_tensor_name_map``), quantizes them (``gguf.quants``) and writes the file. What it
lacks is the per-architecture part of llama.cpp's ``convert_hf_to_gguf.py``, a script that
is not installable; the few rules taken from it are written here, each with its reason:

- Llama: q/k rows are permuted from Hugging Face's rotate-half RoPE layout to the
  interleaved layout llama.cpp's RoPE kernel reads (``LlamaModel.permute`` there).
- GPT-2: the Conv1D weights are stored (in, out) and are transposed to (out, in);
  ``output.weight`` is written out explicitly, since llama.cpp's GPT-2 graph needs it.
- Precision: 1-D tensors, norms and position embeddings stay float32; a tensor whose
  row length the block size does not divide falls back to f16 (both as the converter does).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch

from chattune.errors import UserError

# Hugging Face model_type -> GGUF architecture written
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}
Q = gguf.GGMLQuantizationType
QUANTS = {  # --quant -> (tensor type, file type)
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_F32_ALWAYS = ("_norm.weight", "_norm.bias", "position_embd.weight")


@dataclass
class QuantSummary:
    """What precision each tensor was written in, and how many fell back to f16."""

    types: Counter = field(default_factory=Counter)
    fell_back: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items()))
        tail = f"; {len(self.fell_back)} fell back to f16 (row length not a multiple of the block)" if self.fell_back else ""
        return kinds + tail


def gguf_arch(config) -> gguf.MODEL_ARCH:
    """The GGUF architecture for a transformers config, or a UserError naming the supported ones."""
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise UserError(f"GGUF export supports {', '.join(sorted(ARCHS))} models, not '{config.model_type}'; "
                        f"use the Hugging Face export (chattune export RUN OUT)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"GGUF export does not write RoPE scaling ('{rope.get('rope_type')}'); "
                        f"use the Hugging Face export")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("GGUF export of Llama-family models with attention or MLP biases is not supported")
    return arch


def add_hparams(writer: gguf.GGUFWriter, config, quant: str) -> None:
    """The architecture's hyperparameters, under llama.cpp's key names."""
    writer.add_file_type(QUANTS[quant][1])
    if config.model_type == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_vocab_size(config.vocab_size)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half rows (HF) -> interleaved pairs (llama.cpp), per head; w is (heads * head_dim, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qk_heads(config, gguf_name: str) -> int | None:
    if config.model_type == "gpt2":
        return None
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return config.num_key_value_heads
    return None


def model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) for every weight the file holds."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf_arch(config), config.num_hidden_layers)
    seen = set()
    for hf_name, t in model.state_dict().items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # GPT-2's causal-mask buffers and RoPE caches: recomputed by llama.cpp
        if hf_name == "lm_head.weight" and config.model_type != "gpt2" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reads token_embd for the output as well
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export cannot place the tensor '{hf_name}' of this {config.model_type} model")
        if name in seen:
            continue
        seen.add(name)
        w = t.detach().float().cpu().numpy()
        if config.model_type == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            w = w.T  # Conv1D stores (in, out)
        if (heads := _qk_heads(config, name)) is not None:
            w = permute_qk(w, heads)
        yield name, np.ascontiguousarray(w)
        if name == "token_embd.weight" and config.model_type == "gpt2" and "lm_head.weight" not in model.state_dict():
            seen.add("output.weight")
            yield "output.weight", np.ascontiguousarray(w)


def encode(name: str, w: np.ndarray, quant: str, summary: QuantSummary) -> tuple[np.ndarray, Q]:
    """``w`` in the requested precision, or float32/f16 where llama.cpp's converter keeps those."""
    qtype = QUANTS[quant][0]
    if w.ndim <= 1 or name.endswith(_F32_ALWAYS):
        qtype = Q.F32
    try:
        data = gguf.quants.quantize(w, qtype)
    except gguf.quants.QuantError:
        summary.fell_back.append(name)
        qtype = Q.F16
        data = gguf.quants.quantize(w, qtype)
    summary.types[qtype.name.lower()] += 1
    return data, qtype


def lora_tensors(model) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """A PEFT LoRA model as llama.cpp adapter tensors: ``(alpha, [(name.lora_a, A), (name.lora_b, B)])``.

    A is (r, in) and B (out, r) as PEFT stores them, which is the layout llama.cpp checks.
    llama.cpp scales every pair by ``alpha / r`` with one alpha per file; PEFT's per-module
    scaling (rank or alpha patterns, rsLoRA) is folded into B so one alpha serves all.
    """
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    peft_cfg = model.peft_config[adapter]
    if peft_cfg.modules_to_save or getattr(peft_cfg, "bias", "none") != "none":
        raise UserError("--adapter-only writes LoRA matrices only; this run also trains whole modules or biases: "
                        "export it merged (without --adapter-only)")
    config = model.base_model.model.config
    names = gguf.get_tensor_name_map(gguf_arch(config), config.num_hidden_layers)
    alpha, out = None, []
    for module_name, m in model.named_modules():
        if not isinstance(m, LoraLayer) or adapter not in m.lora_A:
            continue
        hf_name = module_name.removeprefix("base_model.model.") + ".weight"
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise UserError(f"llama.cpp adapters cannot hold LoRA on '{hf_name}'; export merged instead")
        a = m.lora_A[adapter].weight.detach().float().cpu().numpy()  # (r, in)
        b = m.lora_B[adapter].weight.detach().float().cpu().numpy()  # (out, r)
        effective = m.scaling[adapter] * a.shape[0]
        alpha = alpha or effective
        b = b * (effective / alpha)
        if (heads := _qk_heads(config, name)) is not None:
            b = permute_qk(b, heads)  # B's rows are the output rows the base weight's permutation moves
        out += [(name + ".lora_a", np.ascontiguousarray(a)), (name + ".lora_b", np.ascontiguousarray(b))]
    if not out:
        raise UserError("the run holds no LoRA matrices to write")
    return float(alpha), out
