"""The engine on CUDA: greedy answers equal transformers' ``generate``, and the CPU-only paths
(oneDNN packed linears, engine/packed.py) stay off. Runs only where a GPU is (``-m gpu``)."""

from __future__ import annotations

import copy

import pytest
import torch

from chattune.data import DataConfig, prepare
from chattune.engine import GREEDY, Engine, Request, Variant
from chattune.methods import get_method
from tiny import make_model, make_tokenizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    data = prepare(DataConfig(max_length=128), tokenizer)
    return [s["input_ids"][: 5 + 5 * i] for i, s in enumerate(data.splits["train"][:6])]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_engine_greedy_equals_hf_generate_on_cuda(method, arch, tokenizer, prompts):
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 matmuls as float32: argmax ties stay untouched
    torch.backends.cudnn.allow_tf32 = False
    m = get_method(method)
    model = m.apply(copy.deepcopy(make_model(arch, len(tokenizer))), m.config_cls(), tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.02 if method == "full" else 0.1))
    model = model.cuda().eval()
    engine = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1, max_batch=4)  # 4 slots: rows come and go
    assert engine.device.type == "cuda"
    assert not any(p.modules for p in engine.packed.values())  # oneDNN packing is CPU-only
    lengths = [3, 9, 5, 12, 4, 7]
    answers = engine.run([Request(p, max_new_tokens=n, sampling=GREEDY) for p, n in zip(prompts, lengths)])
    for prompt, n, answer in zip(prompts, lengths, answers):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        want = out[0, len(prompt):].tolist()  # generate stops at the models' end token (0); the engine here does not
        assert len(want) == n or want[-1] == 0
        assert answer.token_ids[: len(want)] == want
