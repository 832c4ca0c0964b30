"""Tiny models and a tokenizer built in-process, saved as HF directories for CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
SAMPLE = Path(__file__).parents[1] / "src" / "chattune" / "resources" / "sample_arena.jsonl"


def corpus() -> list[str]:
    texts = ["### Human:\n", "\n\n### Assistant:\n"]
    for line in SAMPLE.read_text().splitlines():
        row = json.loads(line)
        for side in ("conversation_a", "conversation_b"):
            texts += [t["content"] for t in row.get(side, [])]
    return texts


def make_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the built-in sample; pad == eos as in the seed."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def make_model(arch: str, vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                         eos_token_id=0, bos_token_id=0, pad_token_id=0, initializer_range=0.2)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=0, bos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg)


def save_tiny(path: Path, arch: str) -> Path:
    """A tiny random ``arch`` model plus tokenizer as a local HF directory."""
    tok = make_tokenizer()
    model = make_model(arch, len(tok))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random GPT-2 and Llama directories, built once per test session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny(root / arch, arch) for arch in ("gpt2", "llama")}


def kill_after_checkpoint(proc, run_dir: Path, first: int, last: int) -> None:
    """SIGKILL ``proc`` as soon as ``run_dir`` holds a checkpoint of a step in [first, last)."""
    import os
    import signal
    import time

    deadline = time.time() + 120
    while time.time() < deadline:
        state = run_dir / "checkpoint" / "state.json"
        if state.is_file() and first <= json.loads(state.read_text())["step"] < last:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
