"""``chattune.data.load``: the data step alone, as ``chattune data`` runs it: what was kept,
dropped and tokenised, and rendered samples with the loss-bearing part marked."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chattune.config import from_dict
from chattune.data.config import DataConfig
from chattune.data.pairs import load_pairs, prepare_pairs, vote_account
from chattune.data.render import PreparedData, prepare
from chattune.data.select import ConversationSet, load_conversations
from chattune.data.votes import load_kto, prepare_kto
from chattune.data.summary import format_summary, marked_text, marked_tokens, pick, summary_dict
from chattune.errors import UserError


@dataclass
class DataSelection:
    """The selected conversations and, with a tokenizer, the tokenised splits.

    Attributes:
        config: the data settings used.
        conversations: the kept conversations (``samples``), with counts of dropped rows.
        prepared: the tokenised splits (None without a model or tokenizer).
        summary: what ``chattune data --json`` prints (rows read, kept, dropped by
            reason, samples per split, token counts).
    """

    config: DataConfig
    conversations: ConversationSet
    prepared: PreparedData | None
    summary: dict
    tokenizer: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        return format_summary(self.summary)

    def samples(self, n: int = 3, seed: int = 0, marks: tuple[str, str] = ("⟦", "⟧")) -> list[dict]:
        """``n`` rendered samples (``id``, ``split``, ``text``), each loss-bearing part
        wrapped in ``marks``: tokenised as training sees them when there is a tokenizer."""
        if n <= 0:
            return []
        if self.prepared is None:
            if self.config.template == "chat":
                raise UserError("--show with --template chat needs --model or --tokenizer")
            rows = self.conversations.samples
            return [{"id": rows[i]["id"], "split": rows[i]["split"], "text": _marked_row(rows[i], marks)}
                    for i in pick(n, len(rows), seed)]
        rows = [s | {"split": name} for name, split in self.prepared.splits.items() for s in split]
        return [{"id": rows[i]["id"], "split": rows[i]["split"],
                 "text": marked_tokens(rows[i]["input_ids"], rows[i]["labels"], self.tokenizer, marks)}
                for i in pick(n, len(rows), seed)]


def select(cfg: DataConfig, model: str | None = None, tokenizer: str | None = None, objective: str = "sft",
           ties: bool = False) -> DataSelection:
    """The data step for ``cfg`` as ``objective`` selects (``ties``: DPO's tie pairs kept);
    tokenised with ``model``'s (or ``tokenizer``'s) tokenizer if given."""
    name = model or tokenizer
    tok = _load_tokenizer(model, tokenizer) if name else None
    if objective == "sft":
        prepared = prepare(cfg, tok) if tok is not None else None
        conversations = prepared.conversations if prepared else load_conversations(cfg)
        return DataSelection(cfg, conversations, prepared, summary_dict(cfg, conversations, prepared, name), tok)
    if objective == "kto":
        prepared = prepare_kto(cfg, tok) if tok is not None else None
        conversations = prepared.conversations if prepared else load_kto(cfg)
        became = [f"{s['vote']}_{'desirable' if s['label'] else 'undesirable'}" for s in conversations.samples]
    else:
        prepared = prepare_pairs(cfg, tok, ties) if tok is not None else None
        conversations = prepared.conversations if prepared else load_pairs(cfg, ties)
        became = ["tie_pairs" if s["tie"] else "decided_pairs" for s in conversations.samples]
    summary = summary_dict(cfg, conversations, prepared, name)
    summary["votes"] = prepared.votes() if prepared else vote_account(conversations, Counter(became), Counter())
    summary["objective"] = objective
    return DataSelection(cfg, conversations, prepared, summary, tok)


def _marked_row(row: dict, marks: tuple[str, str]) -> str:
    if "messages" in row:
        return marked_text(row["messages"], marks)  # SFT's conversations and KTO's answers
    return marked_text(row["chosen"], marks) + "\n--- rejected:\n" + marked_text(row["rejected"], marks)


def load(dataset: str = "sample", *, model: str | None = None, tokenizer: str | None = None,
         **settings: Any) -> DataSelection:
    """Load, select and split conversations as a training run would.

    Args:
        dataset: ``sample`` (built-in), a hub dataset, or a .jsonl/.json/.parquet file.
        model: tokenise with this model's tokenizer (hub id, local dir, ``smollm2-135m``).
        tokenizer: or with this tokenizer (local directory or hub id).
        **settings: any ``data:`` setting (``chattune data --help``), e.g. ``format``,
            ``max_length``, ``template``, ``min_votes``.

    Returns:
        The ``DataSelection``: ``str()`` of it is the CLI's summary, ``.samples(n)`` shows
        rendered conversations with the loss-bearing part marked.

    Raises:
        UserError: an unknown setting, a missing file, a tokenizer that does not load.
    """
    if model and tokenizer:
        raise UserError("give model or tokenizer, not both")
    return select(from_dict(DataConfig, {"dataset": dataset, **settings}, "data"), model, tokenizer)


def _load_tokenizer(model: str | None, path: str | None):
    if model:
        from chattune.models.loading import load_tokenizer

        return load_tokenizer(model)
    return _tokenizer_from(path)


def _tokenizer_from(name: str):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    folder = Path(name).expanduser()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as e:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            # bare GPT-2 BPE files without a config AutoTokenizer understands
            # (transformers 5 ignores vocab_file=/merges_file= here and builds an empty BPE)
            return GPT2TokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
        raise UserError(f"cannot load a tokenizer from '{name}' ({type(e).__name__}); give a local tokenizer "
                        "directory, or a hub id while online") from None
