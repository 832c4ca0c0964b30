"""Prompt-lookup drafts: the engine's speculative steps guess a row's next tokens from its
own history (Saxena 2023, "Prompt Lookup Decoding"; transformers' ``prompt_lookup_num_tokens``).

The last 1 to ``NGRAM`` tokens of a row (prompt + answer so far) are looked up in its
earlier text; the tokens that followed their latest earlier occurrence are the draft. The
model then checks the draft in one forward over all its tokens, and every draft token
that equals what the engine would have chosen anyway is kept (``Engine._decode``).
Answers copy from their prompts (code, names, lists) and repeat themselves, so drafts
are often right. On a CPU a forward of one row is bound by reading the weights, not by
its tokens (a forward of 4 or 8 tokens costs little more than one of 1:
benchmarks/decode_rows.py measures it), so a step that keeps two tokens costs little more
than one that keeps one.

Written here rather than with transformers' ``PromptLookupCandidateGenerator``: that one
plugs into ``generate`` (one batch, one sampling setting) and rescans the whole sequence
at every step; here each row keeps an index of its n-grams, updated as tokens arrive.
"""

from __future__ import annotations

NGRAM = 3  # longest suffix looked up; shorter ones are tried when it is not found
DRAFT_TOKENS = 8  # the most a row proposes in one step
# Whether a row drafts, and how much, follows its recent draft tokens. A drafted token
# costs a row of the step's matmuls whether kept or not: cheap at one row, a real share of
# a row's whole step at 32 rows (benchmarks/decode_rows.py). Kept tokens come in runs (a copied
# passage, a loop): a row sends twice its last run plus one (at least MIN_DRAFT), so a
# looping row soon checks DRAFT_TOKENS a step and a row whose drafts fail sends few.
# Sampled rows keep few (the repetition penalty works against repeating the history): far
# fewer drafts are kept under the shipped sampling than greedy
# (benchmarks/generation.py --drafts); below KEEP_RATE a row only probes now and then.
# benchmarks/draft_replay.py replays an eval's answers through this policy: the steps and
# fed tokens it takes per answer token, greedy and sampled.
KEEP_RATE = 0.3
MIN_DRAFT = 2
PROBE_EVERY = 8  # steps between two probes of a row below KEEP_RATE


class Lookup:
    """The n-gram index of one row's history: n-gram -> where its latest continuation starts."""

    def __init__(self, history: list[int]):
        self.history: list[int] = []
        self.next: dict[tuple[int, ...], int] = {}
        for token in history:
            self.add(token)
        self.keep_rate = 2 * KEEP_RATE  # recent share of draft tokens kept
        self.waited = 0  # steps without drafts since the last probe
        self.last = 0  # draft tokens kept at the last speculative step

    def wanted(self, limit: int = DRAFT_TOKENS) -> int:
        """How many tokens to draft this step (0: none), given the recent draft tokens kept."""
        if self.keep_rate < KEEP_RATE:
            self.waited += 1
            if self.waited < PROBE_EVERY:
                return 0
            self.waited = 0
            return min(limit, MIN_DRAFT)
        return min(limit, max(MIN_DRAFT, 2 * self.last + 1))

    def checked(self, drafted: int, kept: int) -> None:
        """Record a speculative step's outcome."""
        self.keep_rate = 0.7 * self.keep_rate + 0.3 * kept / drafted
        self.last = kept

    def add(self, token: int) -> None:
        h = self.history
        h.append(token)
        p = len(h) - 1  # the n-grams ending just before p now continue at p
        for n in range(1, min(NGRAM, p) + 1):
            self.next[tuple(h[p - n:p])] = p

    def draft(self, limit: int = DRAFT_TOKENS) -> list[int]:
        """Up to ``limit`` tokens that followed the longest suffix's latest earlier occurrence.
        Where that continuation reaches the end of the history, it goes on copying its own
        start (as LZ77 copies overlap): the suffix's latest occurrence in a loop of period p
        ends p tokens back, and the loop predicts itself beyond them."""
        h = self.history
        for n in range(min(NGRAM, len(h)), 0, -1):
            at = self.next.get(tuple(h[-n:]))
            if at is not None:
                out = h[at:at + limit]
                while len(out) < limit:
                    out.append(out[len(out) - (len(h) - at)])
                return out
        return []
