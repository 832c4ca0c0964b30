"""Render conversations to token ids and labels, and prepare the tokenised splits.

A conversation renders to turns, each a prompt part and an answer part made of pieces:
template markup (tokenised with special tokens recognised) and message text (tokenised
with ``split_special_tokens=True``, so "<|im_start|>" or "<|endoftext|>" typed by a user
is plain text and can never become a control token). Tokenising piece by piece keeps the
labels exact: the loss covers the answer's tokens and the EOS that closes it, nothing else.
The same pieces build the generation prompt, so training and chat see identical tokens.

Templates: ``seed`` (the notebook's '### Human:' / '### Assistant:' + EOS), ``chat`` (the
tokenizer's own chat template) and ``auto`` (``chat`` when the tokenizer has a template,
``seed`` otherwise), resolved against the tokenizer by ``resolve_template``. Under the
chat template an answer ends with the template's end-of-turn token (``answer_end_id``:
``<|im_end|>`` for ChatML), which need not be the tokenizer's EOS.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from chattune.data.config import DataConfig
from chattune.data.select import ConversationSet, load_conversations
from chattune.errors import UserError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips

SEED_USER = "### Human:\n"
SEED_ASSISTANT = "\n\n### Assistant:\n"
# Anything that reads like a seed role marker ("### Human:", "##assistant :") inside a
# message loses its hashes, so text cannot open a fake turn.
SEED_MARKER = re.compile(r"#+[ \t]*(human|assistant)[ \t]*:", re.IGNORECASE)

Piece = tuple[str, bool]  # (text, is_message_text)
Turn = tuple[list[Piece], list[Piece]]  # (prompt pieces, answer pieces)


def resolve_template(template: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """'auto' -> 'chat' when ``tokenizer`` has a chat template, else 'seed'; other names as they are."""
    if template != "auto":
        return template
    return "chat" if getattr(tokenizer, "chat_template", None) else "seed"


def stop_strings(template: str, tokenizer: PreTrainedTokenizerBase | None = None) -> list[str]:
    """Strings that end a generated answer, beyond the end-of-answer token: a turn the model starts itself.

    Under a chat template that is the user turn's header, when it survives decoding: the
    engine matches stop strings on text decoded without special tokens, so a header made
    of special tokens (ChatML's ``<|im_start|>user``) cannot be told from plain text and
    gives no stop string. The end-of-turn token stops such a model instead (``answer_end_id``).

    Args:
        template: "seed", "chat" or "auto".
        tokenizer: the model's tokenizer; needed for "chat" and "auto".
    """
    if template != "seed" and tokenizer is None:
        raise ValueError(f"stop_strings('{template}') needs the tokenizer")
    template = resolve_template(template, tokenizer)
    if template == "seed":
        return [SEED_USER.strip(), SEED_ASSISTANT.strip()]
    header = _chat_markup(tokenizer)[1].strip()
    if header and _visible(tokenizer, header) == header:
        return [header]
    return []


def answer_end_id(template: str, tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends an answer: the chat template's end-of-turn token, else EOS.

    The first special token the chat template writes after an answer (``<|im_end|>`` in
    ChatML, ``<|eot_id|>`` in Llama 3); EOS for the seed template, or when the template
    closes a turn with plain text only.
    """
    ends = turn_token_ids(tokenizer, template)[0]
    return ends[0] if ends else tokenizer.eos_token_id


def _chat_markup(tokenizer) -> tuple[str, str]:
    """(markup closing an answer, markup opening a later user turn), from a probe conversation."""
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    turns = _chat_turns(probe, tokenizer)
    return turns[0][1][-1][0], turns[1][0][0][0]


def _visible(tokenizer, text: str) -> str:
    """``text`` as the engine's detokeniser shows it: special tokens dropped."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def turn_token_ids(tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Special tokens of the chat template that end an answer: ``(end_ids, stop_ids)``.

    ``end_ids``: the end-of-turn token the template puts after an answer (``<|im_end|>``),
    when it is not the tokenizer's EOS: reaching it is the model stopping. ``stop_ids``:
    special tokens that open the next turn (``<|im_start|>``): an answer that writes one
    starts a new turn itself. Decoded text skips special tokens, so stop strings cannot
    see them. The seed template's markers are plain text: ``stop_strings`` covers them.
    """
    if resolve_template(template, tokenizer) != "chat":
        return (), ()
    closing, opening = _chat_markup(tokenizer)
    special = set(tokenizer.all_special_ids)

    def ids(text: str) -> list[int]:
        return [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in special]

    ends = [i for i in ids(closing) if i != tokenizer.eos_token_id]
    opens = [i for i in ids(opening) if i not in ends and i != tokenizer.eos_token_id]
    return tuple(dict.fromkeys(ends)), tuple(dict.fromkeys(opens))


def neutralise_seed(text: str) -> str:
    """'### Human:' -> 'Human:' so a message cannot fake a seed-template turn."""
    return SEED_MARKER.sub(lambda m: m.group(0).lstrip("#").lstrip(), text)


def tokenize_conversation(messages: list[dict], tokenizer: PreTrainedTokenizerBase,
                          cfg: DataConfig) -> tuple[list[int], list[int]] | None:
    """Token ids and labels of a conversation ending with an answer.

    Labels are ``IGNORE_INDEX`` except the answers and the EOS closing each (every token
    with ``cfg.train_on_prompt``); ``labels[0]`` is always ignored so a packed row never
    predicts across a conversation boundary. Turns beyond ``cfg.max_length`` are dropped
    whole; only a first pair that alone is too long has its answer cut.

    Args:
        messages: alternating user/assistant turns, ending with an assistant turn.
        tokenizer: a Hugging Face tokenizer with an EOS token.
        cfg: supplies ``template``, ``train_on_prompt`` and ``max_length``.

    Returns:
        ``(input_ids, labels)``, or None when no answer token fits in ``max_length``.
    """
    out = _tokenize(messages, tokenizer, cfg)
    return None if out is None else out[:2]


def render_prompt_ids(messages: list[dict], tokenizer: PreTrainedTokenizerBase, template: str) -> list[int]:
    """Token ids of a conversation ending with a user turn, followed by the assistant header.

    Args:
        messages: alternating user/assistant turns, ending with a user turn.
        tokenizer: the model's tokenizer.
        template: "seed", "chat" or "auto".

    Returns:
        Ids ready for ``model.generate``.
    """
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("render_prompt_ids needs a conversation that ends with a user turn")
    template = resolve_template(template, tokenizer)
    return [i for prompt, answer in _encode(_turns(messages, tokenizer, template), tokenizer, template)
            for i in prompt + answer]


def _tokenize(messages: list[dict], tokenizer, cfg: DataConfig) -> tuple[list[int], list[int], bool] | None:
    template = resolve_template(cfg.template, tokenizer)
    turns = _encode(_turns(messages, tokenizer, template), tokenizer, template)
    ids: list[int] = []
    labels: list[int] = []
    truncated = False
    for k, (prompt, answer) in enumerate(turns):
        if len(ids) + len(prompt) + len(answer) > cfg.max_length:
            truncated = True
            if k > 0:
                break  # keep whole turns: drop this one and every later one
            room = cfg.max_length - len(prompt)  # the first pair alone is too long: cut its answer
            if room <= 0:
                return None
            answer = answer[:room]
        ids += prompt + answer
        labels += (prompt if cfg.train_on_prompt else [IGNORE_INDEX] * len(prompt)) + answer
        if truncated:
            break
    labels[0] = IGNORE_INDEX  # nothing precedes the first token; in a packed row that is another conversation
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return ids, labels, truncated


# -- pieces -------------------------------------------------------------------------------
def turn_pieces(messages: list[dict], tokenizer: PreTrainedTokenizerBase, template: str) -> list[Turn]:
    """Each turn's pieces (markup, message text) as training and chat render them; for exporters
    that must restate the template elsewhere (a GGUF's Ollama Modelfile)."""
    return _turns(messages, tokenizer, resolve_template(template, tokenizer))


def _turns(messages: list[dict], tokenizer, template: str) -> list[Turn]:
    if template == "chat":
        return _chat_turns(messages, tokenizer)
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has no EOS token; the seed template ends every answer with it")
    return seed_turns(messages, tokenizer.eos_token)


def seed_turns(messages: list[dict], eos: str) -> list[Turn]:
    """The seed template's pieces: '### Human:\n{prompt}\n\n### Assistant:\n{answer}' + EOS per turn."""
    turns: list[Turn] = []
    for m in messages:
        text = neutralise_seed(m["content"])
        if m["role"] == "user":
            turns.append(([(SEED_USER, False), (text, True), (SEED_ASSISTANT, False)], []))
        else:
            turns[-1][1].extend([(text, True), (eos, False)])
    return turns


def _chat_turns(messages: list[dict], tokenizer) -> list[Turn]:
    """Pieces from the tokenizer's chat template, rendered one message at a time.

    Each message is rendered with a stand-in for its text, so the template's markup and
    the message text can be told apart; the answer part is everything the template emits
    between the generation prompt and the next user turn (the end-of-turn token included).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; use --template seed")
    stand_ins = [{"role": m["role"], "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    turns: list[Turn] = []
    before = ""
    for i, m in enumerate(messages):
        is_user = m["role"] == "user"
        text = _apply_template(tokenizer, stand_ins[: i + 1], is_user)
        if not text.startswith(before):
            raise UserError("the tokenizer's chat template renders earlier turns differently once later turns "
                            "follow; chattune cannot place labels on it: use --template seed")
        head, found, tail = text[len(before):].partition(stand_ins[i]["content"])
        if not found:
            raise UserError(f"the tokenizer's chat template does not render {m['role']} messages; use --template seed")
        pieces = [(head, False), (m["content"], True), (tail, False)]
        if is_user:
            turns.append((pieces, []))
        else:
            turns[-1][1].extend(pieces)
        before = text
    return turns


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises its own errors (e.g. "roles must alternate") for templates' checks
        raise UserError(f"the tokenizer's chat template failed ({type(e).__name__}: {e}); use --template seed") from None


def _encode(turns: list[Turn], tokenizer, template: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per turn; two tokeniser calls per conversation."""
    pieces = [p for prompt, answer in turns for p in prompt + answer]
    markup = _batch_ids(tokenizer, [t for t, is_text in pieces if not is_text], split_special=False)
    texts = _batch_ids(tokenizer, [t for t, is_text in pieces if is_text], split_special=True)
    out = []
    for prompt, answer in turns:
        parts = [[next(texts) if is_text else next(markup) for _, is_text in part] for part in (prompt, answer)]
        out.append(([i for ids in parts[0] for i in ids], [i for ids in parts[1] for i in ids]))
    if template == "seed" and out and _adds_bos(tokenizer):
        out[0] = ([tokenizer.bos_token_id] + out[0][0], out[0][1])  # the chat template writes its own BOS
    return out


def _batch_ids(tokenizer, texts: list[str], split_special: bool):
    if not texts:
        return iter([])
    # verbose=False: lengths above the model's limit are expected here, truncation comes later
    enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special, verbose=False)
    return iter(enc["input_ids"])


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts text with BOS (Llama-style); then so do we."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


# -- the tokenised splits -------------------------------------------------------------------
@dataclass
class PreparedData:
    """Tokenised samples per split, and the samples lost to tokenisation.

    ``splits[name]`` is a list of ``{"input_ids", "labels", "id"}``.
    """

    conversations: ConversationSet
    splits: dict[str, list[dict]]
    template: str = "seed"  # the template the samples were rendered with ("auto" resolved)
    token_dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)  # samples shortened to max_length, per split

    def stats(self) -> dict[str, dict]:
        """Per split: samples, tokens, loss-bearing tokens and their share, median and p95 length."""
        out = {}
        for name, samples in self.splits.items():
            lengths = sorted(len(s["input_ids"]) for s in samples)
            tokens = sum(lengths)
            loss = sum(sum(label != IGNORE_INDEX for label in s["labels"]) for s in samples)
            out[name] = {
                "samples": len(samples), "tokens": tokens, "loss_tokens": loss,
                "loss_share": round(loss / tokens, 4) if tokens else 0.0,
                "median_length": float(statistics.median(lengths)) if lengths else 0.0,
                "p95_length": lengths[math.ceil(0.95 * len(lengths)) - 1] if lengths else 0,
                "truncated": self.truncated[name],
            }
        return out


def prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Load, select and tokenise: the data a training run consumes.

    Args:
        cfg: the data configuration.
        tokenizer: the model's tokenizer.

    Returns:
        The tokenised splits with the selection's and the tokenisation's counters.
    """
    conversations = load_conversations(cfg)
    data = PreparedData(conversations, {"train": [], "validation": [], "test": []},
                        resolve_template(cfg.template, tokenizer))
    for sample in conversations.samples:
        out = _tokenize(sample["messages"], tokenizer, cfg)
        if out is None:
            data.token_dropped["no_loss_tokens_after_truncation"] += 1
            continue
        ids, labels, truncated = out
        data.truncated[sample["split"]] += truncated
        data.splits[sample["split"]].append({"input_ids": ids, "labels": labels, "id": sample["id"]})
    return data
