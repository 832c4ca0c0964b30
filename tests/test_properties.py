"""Rules that hold for every input, checked with hypothesis over generated inputs:
rendered labels cover exactly the answers and the token that ends each, and packing any
set of conversations leaves each conversation's loss as it is alone.

Kept fast (few examples, no deadline): they run in the default suite. The OpenAI
request property lives with the serve mapping (test_serve_mapping.py).
"""

from __future__ import annotations

import functools

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from chattune.data import DataConfig, IGNORE_INDEX, batch_plan, collate, prepare
from chattune.data.render import SEED_ASSISTANT, SEED_USER, answer_end_id, neutralise_seed, tokenize_conversation
from chattune.models import attention
from chattune.training.loss import shift_targets, token_losses
from conftest import CHATML, build_model, tiny_tokenizer

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def tokenizer():
    return tiny_tokenizer.__wrapped__()


# Message text: words, markup-like strings a user may type, newlines, non-ASCII.
piece = st.sampled_from(["hello", " world", "\n", "### Human:", "##assistant :", "<|im_start|>", "<|im_end|>",
                         "<|endoftext|>", "é", "✓", " ", ":", "#", "42"])
text = st.lists(piece, min_size=1, max_size=6).map("".join)


@st.composite
def conversations(draw):
    """Alternating user/assistant turns ending with an answer (what selection keeps)."""
    pairs = draw(st.lists(st.tuples(text, text), min_size=1, max_size=4))
    return [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each stretch of labelled positions."""
    out, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


@FAST
@given(conversations(), st.sampled_from(["seed", "chat"]))
def test_labels_are_the_answers_and_their_end_token_only(messages, template):
    tok = tokenizer()
    ids, labels = tokenize_conversation(messages, tok, DataConfig(template=template, max_length=4096))
    end = answer_end_id(template, tok)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    stretches = runs(labels)
    assert len(stretches) == len(answers)  # one labelled stretch per answer, nothing else labelled
    assert all(labels[i] == ids[i] for a, b in stretches for i in range(a, b))
    for (a, b), answer in zip(stretches, answers):
        assert end in ids[a:b]  # the end of every answer is learned
        k = b - 1 - ids[a:b][::-1].index(end)
        # before it: the answer's own tokens, its text and nothing more; after it only the
        # template's closing markup (ChatML's newline after <|im_end|>)
        assert tok.decode(ids[a:k]) == (neutralise_seed(answer) if template == "seed" else answer)
        assert tok.decode(ids[k + 1:b]) == ("" if template == "seed" else "\n")
    prompts = [tok.decode(ids[s:e]) for s, e in zip([0] + [b for _, b in stretches], [a for a, _ in stretches])]
    users = [m["content"] for m in messages if m["role"] == "user"]
    for prompt, user in zip(prompts, users):  # everything unlabelled is the user's turn and its markup
        if template == "seed":
            assert prompt == f"{SEED_USER}{neutralise_seed(user)}{SEED_ASSISTANT}"
        else:
            assert prompt.endswith(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    assert tok.chat_template == CHATML


@functools.cache
def model(attn: str):
    return build_model("gpt2", len(tokenizer()), attn)


@functools.cache
def samples():
    return prepare(DataConfig(max_length=96), tokenizer()).splits["train"][:16]


def losses(attn: str, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return token_losses(model(attn), batch, shift_targets(batch["labels"]))[0]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 15), min_size=2, max_size=4, unique=True), st.integers(192, 300),
       st.sampled_from(["sdpa", "flat"]))
def test_packing_leaves_each_conversations_loss_as_alone(chosen, capacity, layout):
    pad = tokenizer().pad_token_id
    data = [samples()[i] for i in chosen]
    plan = batch_plan([len(s["input_ids"]) for s in data], len(data), packing=True, max_length=capacity,
                      seed=0, epoch=0)
    assert any(len(row) > 1 for mb in plan for row in mb.bins)  # capacity >= 2 x max_length: rows are shared
    attn = attention.NAME if layout == "flat" else layout
    for mb in plan:
        rows = [data[i] for i in mb]
        packed = losses(attn, collate(rows, pad, packing=True, bins=mb.bins, flat=layout == "flat"))
        order = [rows[j] for row in mb.bins for j in row]  # the packed losses come in this order
        counts = [sum(label != IGNORE_INDEX for label in s["labels"]) for s in order]
        assert packed.shape[0] == sum(counts)
        for sample, share in zip(order, packed.split(counts)):
            alone = losses(attn, collate([sample], pad, packing=False))
            torch.testing.assert_close(share.sum(), alone.sum(), atol=1e-4, rtol=1e-5)
