"""A run's tokenizer and chat template as GGUF metadata, the way llama.cpp reads them.

``gguf.SpecialVocab`` (llama.cpp's library) reads the merges, the special token ids and the
add-BOS flag from the saved tokenizer. The token list, the token types and the
pre-tokenizer name are what llama.cpp's converter computes by hand; they follow its
``get_vocab_base`` here. Only byte-level BPE vocabularies (GPT-2, SmolLM2, Llama 3) are
written: llama.cpp splits text with a fixed regex per ``tokenizer.ggml.pre`` name, so the
name is chosen by matching the tokenizer's own pre-tokenizer, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from chattune.data import resolve_template, turn_token_ids
from chattune.data.render import SEED_ASSISTANT, SEED_USER
from chattune.errors import UserError

T = gguf.TokenType
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _jinja(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Jinja string literal


# The seed template ('### Human:\n{prompt}\n\n### Assistant:\n{answer}' + EOS per turn) in
# Jinja, for llama.cpp's chat handling. System messages are dropped, as chattune does.
SEED_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ " + _jinja(SEED_USER) + " + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ " + _jinja(SEED_ASSISTANT) + " + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ " + _jinja(SEED_ASSISTANT) + " }}{% endif %}"
)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for this tokenizer's way of splitting text."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = spec["model"]["type"] == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if byte_level and kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if byte_level and kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex"):
        return "smollm"
    if (byte_level and kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex")
            and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT):
        return "llama-bpe"
    raise UserError("GGUF export writes byte-level BPE tokenizers split the GPT-2, SmolLM or Llama 3 way; "
                    f"this tokenizer is {spec['model']['type']} with pre-tokenizer {kinds or 'none'}")


def token_list(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..n_vocab-1; embedding rows past the tokenizer are padding."""
    if len(tokenizer) > n_vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embeddings")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(T.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
    return tokens, types


def chat_template(tokenizer, template: str) -> str:
    """The run's template as Jinja: the tokenizer's own, or the seed template."""
    return tokenizer.chat_template if resolve_template(template, tokenizer) == "chat" else SEED_CHAT_TEMPLATE


def adds_bos(tokenizer, template: str) -> bool:
    """Whether llama.cpp should put BOS before the rendered prompt: exactly when chattune does
    (the seed template on a tokenizer that starts text with BOS; a chat template writes its own)."""
    bos = tokenizer.bos_token_id
    seed = resolve_template(template, tokenizer) == "seed"
    return seed and bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def add_vocab(writer: gguf.GGUFWriter, tokenizer, tokenizer_dir: Path, n_vocab: int, template: str) -> dict:
    """Write the tokenizer and chat template; returns the ids llama.cpp will stop on."""
    pre = pre_tokenizer_name(tokenizer)
    tokens, types = token_list(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab)
    special.chat_template = chat_template(tokenizer, template)
    special.add_special_token = {"bos": adds_bos(tokenizer, template), "eos": False}
    special.add_to_gguf(writer, quiet=True)
    ends, opens = turn_token_ids(tokenizer, template)
    if ends:  # ChatML's <|im_end|>: llama.cpp's end-of-turn id, an end-of-generation token
        writer.add_eot_token_id(ends[0])
    return {"eos": tokenizer.eos_token_id, "eot": ends[0] if ends else None, "turn_opening": list(opens)}
