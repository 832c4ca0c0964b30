"""Trained tiny runs for the GGUF export tests, built once per module on first use.

The tiny GPT-2 here has 1024 positions: transformers' GGUF reader maps llama.cpp's context
length to GPT-2's ``n_ctx`` only, so any other ``n_positions`` fails to load there
(llama.cpp itself reads it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CHATML
from tiny import make_model, make_tokenizer
from transformers import GPT2LMHeadModel

from chattune.cli import main


def base_dir(root: Path, arch: str, chatml: bool = False) -> Path:
    tok = make_tokenizer()
    if chatml:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
    model = make_model(arch, len(tok))
    if arch == "gpt2":
        torch.manual_seed(0)
        model.config.n_positions = 1024
        model = GPT2LMHeadModel(model.config)
    path = root / f"{arch}{'-chatml' if chatml else ''}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", name="runs")
def trained_runs(tmp_path_factory):
    """Trained runs, built on first use: runs(method, arch[, chatml])."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict = {}

    def get(method: str, arch: str, chatml: bool = False) -> Path:
        key = (method, arch, chatml)
        if key not in cache:
            out = root / "-".join(map(str, key))
            assert main(["train", "--model", str(base_dir(root, arch, chatml)), "--method", method,
                         "--max-steps", "2", "--lr", "1e-2", "--output-dir", str(out), "--max-length", "128",
                         "--precision", "fp32"]) == 0
            cache[key] = out
        return cache[key]

    return get
