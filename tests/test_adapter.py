"""Bottleneck adapters on tiny GPT-2 and Llama models built in-process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from chattune.config import from_dict
from chattune.errors import UserError
from chattune.methods import REGISTRY, count_parameters
from chattune.methods.adapter import (
    AdapterConfig,
    AdapterWrapper,
    adapter_params,
    apply,
    disable,
    load,
    save,
    trainable_param_formula,
)

VOCAB = 300


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB)).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(cfg).eval()


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(params=list(MODELS))
def build(request):
    return MODELS[request.param]


@pytest.fixture(params=["houlsby", "pfeiffer"])
def placement(request):
    return request.param


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))  # (B, T)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def train(model, ids: torch.Tensor, steps: int) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(adapter_params(model).values(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture
def trained(build, placement):
    """(model after 30 steps, base logits, losses, ids) for one architecture x placement."""
    ids = batch()
    model = build()
    base = logits(model, ids)
    model = apply(model, AdapterConfig(placement=placement))
    losses = train(model, ids, steps=30)
    return model, base, losses, ids


def test_registered():
    method = REGISTRY["adapter"]
    assert method.config_cls is AdapterConfig and method.merge is None and method.supports_packing


def test_step0_identity(build, placement):
    ids = batch()
    model = build()
    base = logits(model, ids)
    apply(model, AdapterConfig(placement=placement))
    assert torch.equal(logits(model, ids), base)


def test_only_adapters_train_and_count_matches_formula(build, placement):
    model = build()
    cfg = AdapterConfig(placement=placement)
    apply(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(model))
    assert all(".adapter." in n for n in trainable)
    assert count_parameters(model)[0] == trainable_param_formula(model.config, cfg)
    n_wrappers = sum(isinstance(m, AdapterWrapper) for m in model.modules())
    assert n_wrappers == model.config.num_hidden_layers * (2 if placement == "houlsby" else 1)


def test_training_changes_logits_and_loss_falls(trained):
    model, base, losses, ids = trained
    assert not torch.equal(logits(model, ids), base)
    # A frozen random base caps how far the logits can move (tied 0.02-std embeddings),
    # so the drop is modest: about 0.2 nats from log(300) = 5.7 in 30 steps.
    assert losses[-1] < losses[0] - 0.1, losses


def test_disable_restores_base_logits(trained):
    model, base, _, ids = trained
    with disable(model):
        assert torch.equal(logits(model, ids), base)
    assert not torch.equal(logits(model, ids), base)  # and the adapters come back on exit


def test_save_load_round_trip_is_bit_exact(trained, build, tmp_path):
    model, _, _, ids = trained
    save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "adapter"
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == set(adapter_params(model))
    reloaded = load(build(), tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_generate_with_and_without_kv_cache_agree(trained):
    model, _, _, ids = trained
    prompt = ids[:1, :6]
    kw = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == prompt.shape[1] + 8
    assert torch.equal(cached, uncached)


def test_residual_layer_norm_variant(build, tmp_path):
    ids = batch()
    model = build()
    base = logits(model, ids)
    cfg = AdapterConfig(placement="houlsby", residual_layer_norm=True, bottleneck_size=8, activation="gelu")
    apply(model, cfg)
    assert torch.equal(logits(model, ids), base)
    assert count_parameters(model)[0] == trainable_param_formula(model.config, cfg)
    assert any(n.endswith("adapter.norm.weight") for n in adapter_params(model))
    losses = train(model, ids, steps=5)
    assert losses[-1] < losses[0]
    save(model, tmp_path)
    assert torch.equal(logits(load(build(), tmp_path).eval(), ids), logits(model, ids))


def test_formula_by_hand():
    gpt2 = GPT2Config(n_layer=2, n_embd=64)
    # b = 64 // 16 = 4; per adapter 2*64*4 + 4 + 64 = 580; Houlsby has 2 per layer, 2 layers.
    assert trainable_param_formula(gpt2, AdapterConfig(placement="houlsby")) == 580 * 2 * 2
    assert trainable_param_formula(gpt2, AdapterConfig(residual_layer_norm=True)) == (580 + 128) * 2


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"placement": "parallel"}, "adapter.placement must be 'houlsby' or 'pfeiffer'"),
        ({"activation": "tanh"}, "adapter.activation must be one of"),
        ({"bottleneck_size": 0}, "adapter.bottleneck_size must be a positive integer"),
        ({"reduction_factor": 0}, "adapter.reduction_factor must be a positive integer"),
        ({"dropout": 1.0}, r"adapter.dropout must be in \[0, 1\)"),
    ],
)
def test_invalid_config_is_a_user_error(bad, message):
    with pytest.raises(UserError, match=message):
        AdapterConfig(**bad)


def test_config_from_dict_rejects_unknown_keys():
    assert from_dict(AdapterConfig, {"bottleneck_size": "32"}).bottleneck_size == 32
    with pytest.raises(UserError, match="reduction_factor"):
        from_dict(AdapterConfig, {"reduction_factr": 8})


def test_reduction_too_large_is_a_user_error():
    with pytest.raises(UserError, match="no bottleneck"):
        apply(tiny_gpt2(), AdapterConfig(reduction_factor=128))


def test_unsupported_architecture_is_a_user_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="do not support"):
        apply(model, AdapterConfig())


def test_apply_twice_and_wrong_folder_are_user_errors(tmp_path):
    model = apply(tiny_gpt2(), AdapterConfig())
    with pytest.raises(UserError, match="already has"):
        apply(model, AdapterConfig())
    with pytest.raises(UserError, match="no adapter_config.json"):
        load(tiny_gpt2(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"method": "lora"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not 'adapter'"):
        load(tiny_gpt2(), tmp_path)


def test_weights_from_another_model_are_a_user_error(tmp_path):
    save(apply(tiny_gpt2(), AdapterConfig()), tmp_path)
    with pytest.raises(UserError, match="does not fit"):
        load(tiny_llama(), tmp_path)
