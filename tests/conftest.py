"""Shared fixtures: tokenizers and tiny models built in-process, fixture paths, shared data.

Nothing here touches the network: the tokenizers are trained on the fixture texts in a
few milliseconds and the models are built from configs with fixed seeds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Tests never download; set before transformers or datasets read these.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parents[1]
SAMPLE = REPO / "src" / "chattune" / "resources" / "sample_arena.jsonl"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _corpus() -> list[str]:
    texts = ["### Human:\n", "\n\n### Assistant:\n"]
    for path in [SAMPLE, *sorted(FIXTURES.glob("*.jsonl"))]:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for key in ("conversation_a", "conversation_b", "messages"):
                if isinstance(row, dict) and isinstance(row.get(key), list):
                    texts += [m["content"] for m in row[key] if isinstance(m.get("content"), str)]
    return texts


def _bpe(specials: list[str], vocab_size: int = 500) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style: no BOS added, pad == eos (the seed's situation), a ChatML chat template."""
    tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    out.chat_template = CHATML
    return out


@pytest.fixture(scope="session")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """Llama style: the tokenizer itself prepends <s>; a separate <pad>; no chat template."""
    tok = _bpe(["<s>", "</s>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model(arch: str, vocab_size: int, attn: str = "sdpa") -> torch.nn.Module:
    """A tiny GPT-2 or Llama with fixed random weights, in eval mode (no dropout)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab_size, n_positions=256,
                         bos_token_id=0, eos_token_id=0, attn_implementation=attn)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation=attn)
        model = LlamaForCausalLM(cfg)
    assert model.config._attn_implementation == attn
    return model.eval()


@pytest.fixture
def tiny_gpt2(tiny_tokenizer):
    return build_model("gpt2", len(tiny_tokenizer))


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return build_model("llama", len(tiny_tokenizer))


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the repository (or /work/shared/data); skips when absent."""
    for root in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if (root / "arena_conversations.jsonl").is_file():
            return root
    pytest.skip("../shared/data is not present")
