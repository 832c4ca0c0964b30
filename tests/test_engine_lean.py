"""The lean decode step (engine/lean.py): the same logits as the model's own forward, used
where it applies (Llama-family, plain or LoRA, one variant a forward) and nowhere else."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from chattune.engine import GREEDY, Engine, Request, SamplingParams, Variant
from chattune.engine.lean import LeanDecoder
from chattune.errors import UserError
from chattune.methods import get_method
from tiny import make_model, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def qwen2(vocab: int):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=0, bos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # biases start at 0: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model.eval()


def with_method(name: str, model, tokenizer):
    method = get_method(name)
    out = method.apply(copy.deepcopy(model), method.config_cls(), tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in out.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return out.eval()


class Counted:
    """A lean step that counts its calls on ``engine``."""

    def __init__(self, lean, engine):
        self.lean, self.engine = lean, engine

    def ready(self) -> bool:
        return self.lean.ready()

    def __call__(self, *args):
        self.engine.lean_steps += 1
        return self.lean(*args)


class Recording(Engine):
    """An engine that keeps the logits every choice was made from, and counts lean steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits, self.lean_steps = [], 0
        counted = {id(v): Counted(v, self) for v in self.lean.values() if v is not None}
        self.lean = {name: counted[id(v)] if v is not None else None for name, v in self.lean.items()}

    def _choose(self, logits, rows, seen):
        self.logits.append(logits.detach().clone())
        return super()._choose(logits, rows, seen)


def decode(variants, tokenizer, prompts, lean: bool, sampling=GREEDY, drafts: int = 0, max_batch: int = 4, n: int = 12):
    engine = Recording(variants, tokenizer, eos_id=-1, max_batch=max_batch, draft_tokens=drafts, lean_steps=lean)
    reqs = [Request(p, max_new_tokens=n, sampling=sampling, variant=v) for p, v in prompts]
    answers = engine.run(reqs)
    return [a.token_ids for a in answers], engine


PROMPTS = [[5, 9, 13, 2, 7], [3, 3, 8, 21, 30, 4, 11, 6, 17, 2, 9], [40, 41]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", [None, "lora", "prompt", "prefix", "full"])
def test_lean_steps_give_the_logits_and_answers_of_the_models_forward(arch, method, tokenizer):
    base = make_model("llama", len(tokenizer)).eval() if arch == "llama" else qwen2(len(tokenizer))
    model = with_method(method, base, tokenizer) if method else base
    virtual = getattr(getattr(model, "peft_config", {}).get("default"), "num_virtual_tokens", 0) or 0
    variants = {"tuned": Variant(model, virtual_tokens=virtual)}
    prompts = [(p, "tuned") for p in PROMPTS]
    for max_batch in (1, 3):  # one row a step; rows of different lengths (runs planned)
        want, plain = decode(variants, tokenizer, prompts, lean=False, max_batch=max_batch)
        got, lean = decode(variants, tokenizer, prompts, lean=True, max_batch=max_batch)
        assert lean.lean_steps > 0 and plain.lean_steps == 0
        assert got == want
        for a, b in zip(lean.logits, plain.logits):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_lean_steps_check_drafts_and_sample_like_the_models_forward(tokenizer):
    model = with_method("lora", make_model("llama", len(tokenizer)).eval(), tokenizer)
    loop = [7, 8, 9] * 6  # a prompt that repeats itself: drafts are proposed and some kept
    prompts = [(loop, "tuned"), (PROMPTS[1], "tuned")]
    for sampling in (GREEDY, SamplingParams(seed=3)):
        want, _ = decode({"tuned": Variant(model)}, tokenizer, prompts, lean=False, sampling=sampling, drafts=4, n=24)
        got, lean = decode({"tuned": Variant(model)}, tokenizer, prompts, lean=True, sampling=sampling, drafts=4, n=24)
        assert got == want and lean.lean_steps > 0
    assert lean.drafted > 0


def test_lora_base_rows_run_lean_without_the_adapter_and_mixed_lanes_run_peft(tokenizer):
    from chattune.generate.loaded import method_variants

    model = with_method("lora", make_model("llama", len(tokenizer)).eval(), tokenizer)
    variants = method_variants(get_method("lora"), model)
    tuned_only = [(p, "tuned") for p in PROMPTS]
    base_only = [(p, "base") for p in PROMPTS]
    mixed = [(p, v) for p in PROMPTS for v in ("tuned", "base")]
    for prompts in (tuned_only, base_only):
        want, _ = decode(variants, tokenizer, prompts, lean=False)
        got, lean = decode(variants, tokenizer, prompts, lean=True)
        assert got == want and lean.lean_steps > 0
    base_answers, _ = decode(variants, tokenizer, base_only, lean=True)
    tuned_answers, _ = decode(variants, tokenizer, tuned_only, lean=True)
    assert base_answers != tuned_answers  # the adapter is on for tuned rows only
    want, _ = decode(variants, tokenizer, mixed, lean=False, max_batch=6)
    got, lean = decode(variants, tokenizer, mixed, lean=True, max_batch=6)
    assert got == want
    assert got[0::2] == tuned_answers and got[1::2] == base_answers


@pytest.mark.parametrize("method", ["dora", "ia3", "adapter"])
def test_methods_the_lean_step_does_not_compute_decode_through_their_forward(method, tokenizer):
    model = with_method(method, make_model("llama", len(tokenizer)).eval(), tokenizer)
    prompts = [(p, "tuned") for p in PROMPTS]
    want, _ = decode({"tuned": Variant(model)}, tokenizer, prompts, lean=False)
    got, lean = decode({"tuned": Variant(model)}, tokenizer, prompts, lean=True)
    assert got == want and lean.lean_steps == 0


def test_no_lean_step_for_other_architectures_autocast_or_gradients(tokenizer):
    assert LeanDecoder.build(make_model("gpt2", len(tokenizer))) is None
    llama = make_model("llama", len(tokenizer)).eval()
    lean = LeanDecoder.build(llama)
    assert lean is not None
    with torch.no_grad():
        assert lean.ready()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not lean.ready()
    assert not lean.ready()  # gradients on
    prompts = [(p, "tuned") for p in PROMPTS]
    _, engine = decode({"tuned": Variant(llama)}, tokenizer, prompts, lean=True)
    assert engine.lean_steps > 0
    engine = Recording({"tuned": Variant(llama)}, tokenizer, eos_id=-1, dtype=torch.bfloat16)
    engine.run([Request(PROMPTS[0], max_new_tokens=4, sampling=GREEDY)])
    assert engine.lean_steps == 0


def test_the_lean_step_follows_weights_changed_in_place(tokenizer):
    model = with_method("lora", make_model("llama", len(tokenizer)).eval(), tokenizer)
    variants = {"tuned": Variant(model)}
    prompts = [(p, "tuned") for p in PROMPTS]
    engine = Recording(variants, tokenizer, eos_id=-1, max_batch=3, draft_tokens=0)
    before = [a.token_ids for a in engine.run([Request(p, max_new_tokens=12, sampling=GREEDY) for p, _ in prompts])]
    inner = model.get_base_model().model
    with torch.no_grad():  # a training step between two evaluations: base and low-rank weights move
        for proj in (inner.layers[0].self_attn.k_proj, inner.layers[1].self_attn.q_proj, inner.layers[1].mlp.up_proj):
            getattr(proj, "base_layer", proj).weight.mul_(-1.5)
        for m in model.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                m.lora_B["default"].weight.mul_(3)
    after = [a.token_ids for a in engine.run([Request(p, max_new_tokens=12, sampling=GREEDY) for p, _ in prompts])]
    want, _ = decode(variants, tokenizer, prompts, lean=False, max_batch=3)
    assert after == want and after != before


def test_float16_weights_decode_through_the_lean_step_near_float32(tokenizer):
    model = with_method("lora", make_model("llama", len(tokenizer)).eval(), tokenizer)
    variants = {"tuned": Variant(model)}
    reqs = [Request(p, max_new_tokens=8, sampling=GREEDY) for p in PROMPTS]
    want = Recording(variants, tokenizer, eos_id=-1, max_batch=1, draft_tokens=0)
    want.run(reqs)
    for weights in ("float16", "bfloat16"):
        half = Recording(variants, tokenizer, eos_id=-1, max_batch=1, draft_tokens=0, weights=weights)
        half.run([Request(p, max_new_tokens=8, sampling=GREEDY) for p in PROMPTS])
        assert half.lean_steps > 0
        lean = next(v for v in half.lean.values()).lean
        assert lean.head.weights == torch.float32 and lean.layers[0][1].weights == getattr(torch, weights)
        # the logits of the first decode step (the prefill's come first, in float32 for both),
        # after the same first token
        a, b = half.logits[1], want.logits[1]
        assert torch.equal(half.logits[0], want.logits[0])
        assert not torch.equal(a, b)  # the weights are rounded: not the float32 step
        torch.testing.assert_close(a, b, atol=0.05 if weights == "bfloat16" else 0.01, rtol=0.02)
    with pytest.raises(UserError, match="unknown decode weights 'int8'"):
        Engine(variants, tokenizer, eos_id=-1, weights="int8")


def test_an_engine_takes_over_the_weight_copies_of_the_last_one(tokenizer):
    model = make_model("llama", len(tokenizer)).eval()
    first = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1, max_batch=1)
    again = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1, max_batch=1, share=first)
    assert again.lean["tuned"] is first.lean["tuned"] and again.packed["tuned"] is first.packed["tuned"]
    other = Engine({"tuned": Variant(model)}, tokenizer, eos_id=-1, max_batch=1, share=first, weights="float16")
    assert other.lean["tuned"] is not first.lean["tuned"]  # other copies: not shared
    fresh = Engine({"tuned": Variant(make_model("llama", len(tokenizer)).eval())}, tokenizer, eos_id=-1, share=first)
    assert fresh.lean["tuned"] is not first.lean["tuned"]  # another model: its own


def test_chat_and_serve_take_the_decode_weights(tokenizer):
    from chattune.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["chat", "run", "--decode-weights", "float16"]).decode_weights == "float16"
    assert parser.parse_args(["chat", "run"]).decode_weights == "float32"
    assert parser.parse_args(["serve", "run", "--decode-weights", "bfloat16"]).decode_weights == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "run", "--decode-weights", "int8"])
