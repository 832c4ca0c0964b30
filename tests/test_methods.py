"""Every method in the registry x {tiny GPT-2, tiny Llama}: identity at step 0, learning,
save/load, cached generation, parameter formulas, export."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from chattune.cli import main
from chattune.data import DataConfig, collate, prepare
from chattune.engine import GREEDY, Engine, Request, Variant
from chattune.training.loss import token_loss_sum
from chattune.methods import all_methods, count_parameters, get_method
from chattune.methods.adapter import AdapterConfig, trainable_param_formula
from tiny import make_model, make_tokenizer, tiny_dirs  # noqa: F401  (fixture)

METHODS = ["lora", "dora", "ia3", "adapter", "prompt", "prefix", "full"]
ARCHS = ["gpt2", "llama"]
IDENTITY = {"lora": 0.0, "ia3": 0.0, "adapter": 0.0, "dora": 1e-5}  # DoRA re-normalises: float rounding only


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def batch(tokenizer):
    data = prepare(DataConfig(max_length=128), tokenizer)
    samples = data.splits["train"][:8]
    return collate(samples, tokenizer.pad_token_id, packing=False)


def fresh(method: str, arch: str, tokenizer, **settings):
    m = get_method(method)
    base = make_model(arch, len(tokenizer)).eval()
    ref = copy.deepcopy(base)
    return m, m.apply(base, m.config_cls(**settings), tokenizer), ref


def test_registry_is_complete():
    assert set(all_methods()) == set(METHODS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(IDENTITY))
def test_identity_at_step_zero(method, arch, tokenizer, batch):
    _, model, ref = fresh(method, arch, tokenizer)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=IDENTITY[method])


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_from_text_starts_as_the_base_model_reading_that_text(arch, tokenizer):
    """With init_text, the prefix holds the base model's keys and values for the text, so
    at step 0 the model equals the base model with the text in front of the input."""
    n = 6
    _, model, ref = fresh("prefix", arch, tokenizer, num_virtual_tokens=n, init_text="Be helpful.")
    text = tokenizer("Be helpful.", add_special_tokens=False)["input_ids"]
    prefix = (text * n)[:n]
    x = torch.randint(1, len(tokenizer), (1, 10))
    model.eval()
    with torch.no_grad():
        got = model(input_ids=x).logits  # (1, 10, V)
        want = ref(input_ids=torch.cat([torch.tensor([prefix]), x], dim=1)).logits[:, n:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_prefix_init_text_with_projection_is_refused():
    from chattune.errors import UserError
    from chattune.methods.peft_methods import PrefixSettings

    assert PrefixSettings(prefix_projection=True).init_text is None  # the default text steps aside
    with pytest.raises(UserError, match="needs prefix_projection=false"):
        PrefixSettings(prefix_projection=True, init_text="Be brief.")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_loss_falls_over_30_steps(method, arch, tokenizer, batch):
    torch.manual_seed(0)
    _, model, _ = fresh(method, arch, tokenizer)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2 if method != "full" else 1e-3)
    losses = []
    for _ in range(30):
        loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss) / n)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_and_cached_generation(method, arch, tokenizer, batch, tmp_path):
    m, model, ref = fresh(method, arch, tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():  # move off the identity so the round trip is not trivially true
        for p in model.parameters():
            if p.requires_grad:  # full fine-tuning moves every weight: a smaller step keeps it sane
                p.add_(torch.randn_like(p) * (0.02 if method == "full" else 0.1))
    model.eval()
    m.save(model, tmp_path)
    loaded = m.load(copy.deepcopy(ref), tmp_path).eval()
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        moved = model(**x).logits[:, -x["input_ids"].shape[1]:]  # prompt tuning adds virtual positions
        assert not torch.allclose(moved, ref.eval()(**x).logits, atol=1e-3)  # the round trip is not base to base
        assert torch.equal(model(**x).logits, loaded(**x).logits)
    # greedy decoding with the KV cache == greedy argmax of full forwards without it
    prompt = batch["input_ids"][0, :12].tolist()
    assert decode(loaded, prompt, 8) == uncached_greedy(loaded, prompt, 8)


@torch.no_grad()
def uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Argmax of full forwards without a KV cache: the definition of greedy decoding."""
    seq, out = list(prompt), []
    for _ in range(n):
        ids = torch.tensor([seq])
        out.append(int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()))
        seq.append(out[-1])
    return out


def decode(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from the engine (KV cache), never stopping early."""
    engine = Engine({"tuned": Variant(model)}, make_tokenizer(), eos_id=-1)
    return engine.run([Request(prompt, max_new_tokens=n, sampling=GREEDY)])[0].token_ids


def expected_trainable(method: str, cfg, settings) -> int:
    """Closed-form trainable parameter counts for the default settings."""
    if cfg.model_type == "gpt2":
        c, layers, kv = cfg.n_embd, cfg.n_layer, cfg.n_embd
        lora_mods = [(c, 3 * c)]  # fused c_attn
        ia3 = (3 * c + 4 * c) * layers  # c_attn output scale + mlp.c_proj input scale
    else:
        c, layers = cfg.hidden_size, cfg.num_hidden_layers
        kv = cfg.num_key_value_heads * (c // cfg.num_attention_heads)
        lora_mods = [(c, c), (c, kv)]  # q_proj, v_proj
        ia3 = (kv + kv + cfg.intermediate_size) * layers  # k, v outputs; down_proj input
    r = 8
    lora = layers * sum(r * (i + o) for i, o in lora_mods)
    return {
        "lora": lora,
        "dora": lora + layers * sum(o for _, o in lora_mods),  # + one magnitude per output feature
        "ia3": ia3,
        "prompt": 20 * c,
        "prefix": 20 * layers * 2 * kv,  # a key and a value vector per layer per virtual token
        "adapter": trainable_param_formula(cfg, AdapterConfig()),
    }[method]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameter_count_matches_formula(method, arch, tokenizer):
    m, model, ref = fresh(method, arch, tokenizer)
    trainable, total = count_parameters(model)
    if method == "full":
        assert trainable == total == count_parameters(ref)[1]
    else:
        assert trainable == expected_trainable(method, ref.config, m.config_cls())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_export_gives_the_runs_logits(method, arch, tiny_dirs, tmp_path, capsys):
    from peft import PeftModel

    from chattune.generate.loaded import load_run
    from chattune.methods import adapter

    run_dir, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--model", str(tiny_dirs[arch]), "--method", method, "--max-steps", "2", "--lr", "1e-2",
                 "--output-dir", str(run_dir), "--max-length", "128", "--precision", "fp32"]) == 0
    assert main(["export", str(run_dir), str(out)]) == 0
    said = capsys.readouterr().out
    run = load_run(run_dir)
    x = torch.randint(1, 300, (2, 16))
    if get_method(method).merge is not None:
        exported = AutoModelForCausalLM.from_pretrained(out)
        assert "merged" in said or method == "full"
    else:
        assert "cannot become plain weights" in said and (out / "LOAD.md").is_file()
        base = AutoModelForCausalLM.from_pretrained(out / "base")
        exported = adapter.load(base, out / "adapter") if method == "adapter" else PeftModel.from_pretrained(
            base, out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(input_ids=x).logits, run.model(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-4)


def test_methods_command_lists_every_method(tiny_dirs, capsys):
    assert main(["methods", "--model", str(tiny_dirs["llama"])]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name} " in out
    assert "3,584" in out  # LoRA r=8 on q_proj,v_proj of the tiny Llama


def test_prompt_tuning_starts_from_the_init_text(tokenizer):
    _, model, ref = fresh("prompt", "llama", tokenizer, num_virtual_tokens=6, init_text="Answer helpfully.")
    ids = tokenizer("Answer helpfully.", add_special_tokens=False)["input_ids"]
    ids = (ids * 6)[:6]
    want = ref.get_input_embeddings()(torch.tensor(ids))
    got = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_projection_trains_and_decodes_with_the_cache(arch, tokenizer, batch):
    _, model, _ = fresh("prefix", arch, tokenizer, num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=32)
    trainable, _ = count_parameters(model)
    assert trainable > 4 * 64  # the MLP's weights train, not only the prefix embedding
    loss, n = token_loss_sum(model.train(), batch)
    (loss / n).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    prompt = batch["input_ids"][0, :10].tolist()
    assert decode(model.eval(), prompt, 5) == uncached_greedy(model, prompt, 5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_frozen_weights_stored_in_bf16_change_nothing_under_autocast(method, arch, tokenizer, batch):
    """Training stores frozen matmul weights in the autocast dtype: same loss, same gradients."""
    from chattune.training.loop import store_frozen_weights_in

    _, model, _ = fresh(method, arch, tokenizer)
    model.train()
    cast = copy.deepcopy(model)
    n = store_frozen_weights_in(cast, torch.bfloat16)
    assert (n == 0) == (method == "full")  # full fine-tuning has no frozen weights
    results = []
    for m in (model, cast):
        torch.manual_seed(0)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = token_loss_sum(m, batch)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.requires_grad}))
    assert torch.equal(results[0][0], results[1][0])
    for k, g in results[0][1].items():
        assert torch.equal(g, results[1][1][k]), k
