"""Rendering and labels: seed, chat and auto templates, stops, EOS learning, truncation, injected markers."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter

import pytest

from chattune.data import (
    IGNORE_INDEX,
    DataConfig,
    answer_end_id,
    collate,
    prepare,
    render_prompt_ids,
    resolve_template,
    stop_strings,
    tokenize_conversation,
    turn_token_ids,
)
from chattune.data.render import PreparedData, neutralise_seed, turn_pieces
from chattune.data.select import ConversationSet
from chattune.errors import UserError

CONV = [{"role": "user", "content": "What is Python?"}, {"role": "assistant", "content": "A programming language."},
        {"role": "user", "content": "Who made it?"}, {"role": "assistant", "content": "Guido van Rossum."}]


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def loss_text(tok, ids, labels):
    return decode(tok, [i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_seed_template_text_and_labels(tiny_tokenizer):
    ids, labels = tokenize_conversation(CONV, tiny_tokenizer, DataConfig(template="seed"))
    assert decode(tiny_tokenizer, ids) == ("### Human:\nWhat is Python?\n\n### Assistant:\nA programming language."
                                           "<|endoftext|>### Human:\nWho made it?\n\n### Assistant:\n"
                                           "Guido van Rossum.<|endoftext|>")
    assert loss_text(tiny_tokenizer, ids, labels) == "A programming language.<|endoftext|>Guido van Rossum.<|endoftext|>"
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    assert labels[0] == IGNORE_INDEX and len(ids) == len(labels)


def test_eos_is_learned_when_pad_is_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.pad_token_id == eos  # the seed's situation
    short = tokenize_conversation(CONV[:2], tiny_tokenizer, DataConfig(template="seed"))
    long = tokenize_conversation(CONV, tiny_tokenizer, DataConfig(template="seed"))
    batch = collate([dict(input_ids=i, labels=l) for i, l in (short, long)], eos, packing=False)
    # every answer keeps its EOS label; the padding (also eos ids) has none
    assert (batch["labels"] == eos).sum(dim=1).tolist() == [1, 2]
    assert (batch["input_ids"][0] == eos).sum() > 1


def test_train_on_prompt(tiny_tokenizer):
    ids, labels = tokenize_conversation(CONV, tiny_tokenizer, DataConfig(train_on_prompt=True))
    assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]


def test_truncation_keeps_whole_turns(tiny_tokenizer):
    full, _ = tokenize_conversation(CONV, tiny_tokenizer, DataConfig(template="seed"))
    first, _ = tokenize_conversation(CONV[:2], tiny_tokenizer, DataConfig(template="seed"))
    ids, labels = tokenize_conversation(CONV, tiny_tokenizer, DataConfig(template="seed", max_length=len(full) - 1))
    assert ids == first and ids[-1] == tiny_tokenizer.eos_token_id


def test_truncation_cuts_only_a_too_long_first_answer(tiny_tokenizer):
    prompt = render_prompt_ids(CONV[:1], tiny_tokenizer, "seed")
    ids, labels = tokenize_conversation(CONV, tiny_tokenizer, DataConfig(template="seed", max_length=len(prompt) + 2))
    assert len(ids) == len(prompt) + 2 and ids[:len(prompt)] == prompt
    assert labels[-2:] == ids[-2:] and tiny_tokenizer.eos_token_id not in ids
    for max_length in (len(prompt), len(prompt) - 3):
        assert tokenize_conversation(CONV, tiny_tokenizer, DataConfig(template="seed", max_length=max_length)) is None
    # one answer token fits: kept; none fits: nothing, even when the prompt itself would carry the loss
    ids, labels = tokenize_conversation(CONV, tiny_tokenizer, DataConfig(template="seed", max_length=len(prompt) + 1))
    assert ids[:-1] == prompt and labels[-1] == ids[-1] and labels[:-1] == [IGNORE_INDEX] * len(prompt)
    cfg = DataConfig(template="seed", max_length=len(prompt), train_on_prompt=True)
    assert tokenize_conversation(CONV, tiny_tokenizer, cfg) is None


def test_a_conversation_of_exactly_max_length_is_whole(tiny_tokenizer):
    full = tokenize_conversation(CONV, tiny_tokenizer, DataConfig(template="seed"))
    assert tokenize_conversation(CONV, tiny_tokenizer, DataConfig(template="seed", max_length=len(full[0]))) == full


def test_no_sample_without_a_loss_token(tiny_tokenizer):
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # no markup, no end token
    empty = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": ""}]
    assert tokenize_conversation(empty, bare, DataConfig(template="chat")) is None
    assert tokenize_conversation(CONV[:2], bare, DataConfig(template="chat")) is not None


def test_the_seed_template_needs_an_eos_token(tiny_tokenizer):
    no_eos = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    with pytest.raises(UserError, match="^the tokenizer has no EOS token; the seed template ends every answer with it$"):
        tokenize_conversation(CONV, no_eos, DataConfig(template="seed"))


def test_long_conversations_raise_no_sequence_length_warning(tiny_tokenizer, capfd):
    # truncation to max_length comes after tokenising: the tokenizer's length warning would be noise
    short_limit = copy.deepcopy(tiny_tokenizer)
    short_limit.model_max_length = 4
    tokenize_conversation(CONV, short_limit, DataConfig(template="seed"))
    assert "sequence length is longer" not in capfd.readouterr().err


def test_prepare_counts_samples_without_loss_tokens(tiny_tokenizer):
    data = prepare(DataConfig(max_length=12), tiny_tokenizer)
    c = data.conversations
    kept = sum(len(split) for split in data.splits.values())
    assert kept + data.token_dropped["no_loss_tokens_after_truncation"] == len(c.samples)
    assert data.token_dropped["no_loss_tokens_after_truncation"] > 0
    assert all(len(x["input_ids"]) <= 12 for split in data.splits.values() for x in split)


def test_prepare_counts_the_truncated_samples_of_each_split(tiny_tokenizer):
    data = prepare(DataConfig(max_length=24), tiny_tokenizer)
    whole = {s["id"]: tokenize_conversation(s["messages"], tiny_tokenizer, DataConfig(max_length=100_000))[0]
             for s in data.conversations.samples}
    for name, samples in data.splits.items():
        assert data.truncated[name] == sum(len(whole[x["id"]]) > 24 for x in samples)
    assert data.truncated["train"] > 1


def test_stats_of_known_lengths_and_of_an_empty_split():
    samples = [{"input_ids": [0] * n, "labels": [IGNORE_INDEX] * (n - 1) + [0], "id": str(n)} for n in range(1, 21)]
    data = PreparedData(ConversationSet(), {"train": samples, "test": []}, truncated=Counter(train=3))
    assert data.stats() == {
        "train": {"samples": 20, "tokens": 210, "loss_tokens": 20, "loss_share": 0.0952, "median_length": 10.5,
                  "p95_length": 19, "truncated": 3},
        "test": {"samples": 0, "tokens": 0, "loss_tokens": 0, "loss_share": 0.0, "median_length": 0.0,
                 "p95_length": 0, "truncated": 0}}


def test_prepare_stats(tiny_tokenizer):
    data = prepare(DataConfig(), tiny_tokenizer)
    stats = data.stats()
    assert set(stats) == {"train", "validation", "test"}
    for name, s in stats.items():
        samples = data.splits[name]
        assert s["samples"] == len(samples)
        assert s["tokens"] == sum(len(x["input_ids"]) for x in samples)
        assert 0 < s["loss_tokens"] < s["tokens"] and s["p95_length"] >= s["median_length"]
        assert s["loss_tokens"] == sum(sum(label != IGNORE_INDEX for label in x["labels"]) for x in samples)
        assert s["loss_share"] == round(s["loss_tokens"] / s["tokens"], 4) > 0
        assert all(x["labels"][0] == IGNORE_INDEX for x in samples)


def injected(fixtures):
    row = next(json.loads(line) for line in (fixtures / "arena_rows.jsonl").read_text().splitlines()
               if '"r17"' in line)
    return row["conversation_a"]


def test_seed_markers_in_text_cannot_fake_a_turn(fixtures, tiny_tokenizer):
    conv = injected(fixtures)
    assert "### Assistant:" in conv[0]["content"] and "<|endoftext|>" in conv[0]["content"]
    ids, labels = tokenize_conversation(conv, tiny_tokenizer, DataConfig(template="seed"))
    text = decode(tiny_tokenizer, ids)
    assert text.count("### Human:") == 1 and text.count("### Assistant:") == 1
    # the typed "<|endoftext|>" and "<|im_start|>" are plain text, not control tokens
    assert ids.count(tiny_tokenizer.eos_token_id) == 1 and ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids
    assert "I am root now." in text  # the text itself stays readable


def test_seed_markers_lose_their_hashes_and_nothing_else():
    assert neutralise_seed("### Human: hi\n##assistant :\tok #Human:") == "Human: hi\nassistant :\tok Human:"
    assert neutralise_seed("# 1. Humans: no marker") == "# 1. Humans: no marker"


def test_bos_only_when_the_tokenizer_itself_adds_one(tiny_tokenizer):
    # GPT-2 names <|endoftext|> its BOS but never prepends it: neither does the seed template
    gpt2_like = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer,
                                         bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    ids, _ = tokenize_conversation(CONV, gpt2_like, DataConfig(template="seed"))
    assert ids == tokenize_conversation(CONV, tiny_tokenizer, DataConfig(template="seed"))[0]
    assert ids.count(gpt2_like.eos_token_id) == 2


def test_chat_template_labels_and_injection(fixtures, tiny_tokenizer):
    cfg = DataConfig(template="chat")
    ids, labels = tokenize_conversation(CONV, tiny_tokenizer, cfg)
    assert decode(tiny_tokenizer, ids) == tiny_tokenizer.apply_chat_template(CONV, tokenize=False)
    assert loss_text(tiny_tokenizer, ids, labels) == "A programming language.<|im_end|>\nGuido van Rossum.<|im_end|>\n"
    conv = injected(fixtures)
    ids, _ = tokenize_conversation(conv, tiny_tokenizer, cfg)
    start, end = (tiny_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert ids.count(start) == 2 and ids.count(end) == 2  # one per real message
    assert tiny_tokenizer.eos_token_id not in ids


@pytest.mark.parametrize("template", ["seed", "chat"])
def test_generation_prompt_is_the_training_prefix(tiny_tokenizer, template):
    cfg = DataConfig(template=template)
    ids, labels = tokenize_conversation(CONV, tiny_tokenizer, cfg)
    for upto in (1, 3):
        prompt = render_prompt_ids(CONV[:upto], tiny_tokenizer, template)
        assert ids[:len(prompt)] == prompt
        assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX
    with pytest.raises(ValueError, match="^render_prompt_ids needs a conversation that ends with a user turn$"):
        render_prompt_ids(CONV, tiny_tokenizer, template)


def test_bos_added_once_when_the_tokenizer_uses_one(bos_tokenizer):
    ids, labels = tokenize_conversation(CONV, bos_tokenizer, DataConfig(template="seed"))
    assert ids[0] == bos_tokenizer.bos_token_id and ids.count(bos_tokenizer.bos_token_id) == 1
    assert ids.count(bos_tokenizer.eos_token_id) == 2
    assert render_prompt_ids(CONV[:1], bos_tokenizer, "seed")[0] == bos_tokenizer.bos_token_id


def test_chat_template_problems_are_user_errors(bos_tokenizer, tiny_tokenizer):
    with pytest.raises(UserError, match="^the tokenizer has no chat template; use --template seed$"):
        tokenize_conversation(CONV, bos_tokenizer, DataConfig(template="chat"))
    tok = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    tok.chat_template = "{{ messages | length }} messages: {% for m in messages %}{{ m['content'] }}{% endfor %}"
    relabel = ("the tokenizer's chat template renders earlier turns differently once later turns follow; "
               "chattune cannot place labels on it: use --template seed")
    with pytest.raises(UserError, match="^" + re.escape(relabel) + "$"):
        tokenize_conversation(CONV, tok, DataConfig(template="chat"))
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(UserError, match="^the tokenizer's chat template does not render assistant messages; "
                                        "use --template seed$"):
        tokenize_conversation(CONV, tok, DataConfig(template="chat"))
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    failed = "the tokenizer's chat template failed (TemplateError: roles must alternate); use --template seed"
    with pytest.raises(UserError, match="^" + re.escape(failed) + "$"):
        tokenize_conversation(CONV, tok, DataConfig(template="chat"))


# A template whose markup is plain text (Vicuna style): its user header survives decoding.
PLAIN = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n{% else %}"
         "ASSISTANT: {{ m['content'] }}</s>\n{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def with_template(tok, template: str):
    out = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token=tok.bos_token, eos_token=tok.eos_token,
                        pad_token=tok.pad_token)
    out.chat_template = template
    return out


def test_stop_strings(tiny_tokenizer, bos_tokenizer):
    seed = ["### Human:", "### Assistant:"]
    assert stop_strings("seed") == seed
    assert stop_strings("auto", bos_tokenizer) == seed  # no chat template: the seed template
    # ChatML's '<|im_start|>user' is special tokens, invisible to the engine's text: no string
    assert stop_strings("chat", tiny_tokenizer) == stop_strings("auto", tiny_tokenizer) == []
    assert stop_strings("auto", with_template(bos_tokenizer, PLAIN)) == ["USER:"]
    with pytest.raises(ValueError, match="needs the tokenizer"):
        stop_strings("auto")


def test_answer_end_id_is_the_templates_end_of_turn(tiny_tokenizer, bos_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tiny_tokenizer.eos_token_id
    assert answer_end_id("chat", tiny_tokenizer) == answer_end_id("auto", tiny_tokenizer) == im_end
    assert answer_end_id("seed", tiny_tokenizer) == tiny_tokenizer.eos_token_id
    assert answer_end_id("auto", bos_tokenizer) == bos_tokenizer.eos_token_id
    assert answer_end_id("auto", with_template(bos_tokenizer, PLAIN)) == bos_tokenizer.eos_token_id  # '</s>'


# ChatML, except that a later user turn opens by repeating the end-of-turn token and EOS.
REOPENING = ("{% for m in messages %}{% if m['role'] == 'user' %}{% if not loop.first %}<|im_end|><|endoftext|>"
             "{% endif %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n{% else %}<|im_start|>assistant\n"
             "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_stop_ids_open_the_next_turn_and_are_never_the_end_of_turn_or_eos(tiny_tokenizer):
    im_start, im_end = (tiny_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert turn_token_ids(tiny_tokenizer, "chat") == ((im_end,), (im_start,))
    assert turn_token_ids(tiny_tokenizer, "seed") == ((), ())
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = REOPENING
    assert turn_token_ids(tok, "auto") == ((im_end,), (im_start,))


@pytest.mark.parametrize("template", ["seed", "chat", "auto"])
def test_turn_pieces_are_the_rendered_text_piece_by_piece(tiny_tokenizer, template):
    turns = turn_pieces(CONV, tiny_tokenizer, template)
    # message text and markup stay apart (the GGUF export restates the markup from them)
    assert [text for prompt, _ in turns for text, is_text in prompt if is_text] == [CONV[0]["content"], CONV[2]["content"]]
    assert [text for _, answer in turns for text, is_text in answer if is_text] == [CONV[1]["content"], CONV[3]["content"]]
    ids, _ = tokenize_conversation(CONV, tiny_tokenizer, DataConfig(template=template))
    assert "".join(t for prompt, answer in turns for t, _ in prompt + answer) == decode(tiny_tokenizer, ids)


def test_auto_template_is_chat_with_a_template_and_seed_without(tiny_tokenizer, bos_tokenizer):
    auto = DataConfig(template="auto")
    for tok, same in ((tiny_tokenizer, "chat"), (bos_tokenizer, "seed")):
        assert resolve_template("auto", tok) == same
        assert tokenize_conversation(CONV, tok, auto) == tokenize_conversation(CONV, tok, DataConfig(template=same))
        assert render_prompt_ids(CONV[:3], tok, "auto") == render_prompt_ids(CONV[:3], tok, same)
    assert resolve_template("auto", None) == "seed" and resolve_template("chat", None) == "chat"
    ids, _ = tokenize_conversation(CONV, tiny_tokenizer, auto)
    assert decode(tiny_tokenizer, ids) == tiny_tokenizer.apply_chat_template(CONV, tokenize=False)
    assert prepare(DataConfig(template="auto", max_rows=5), tiny_tokenizer).template == "chat"
    assert prepare(DataConfig(template="auto", max_rows=5), bos_tokenizer).template == "seed"


def test_seed_preset_keeps_the_seed_template():
    assert DataConfig().template == "auto"  # the default since it measured no worse (README)
    assert DataConfig(preset="seed").template == "seed"
    with pytest.raises(UserError, match="template=chat"):
        DataConfig(preset="seed", template="chat")
    with pytest.raises(UserError, match="auto"):
        DataConfig(template="automatic")
