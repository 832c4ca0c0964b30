"""The decoding engine: batched, KV-cached, continuously batched decoding for every method.

eval, chat, compare and serve all decode through ``Engine``; there is no other decoding
loop in chattune.

Why not ``model.generate``: it takes one sampling setting and one stop rule per batch,
keeps finished rows in the batch until the longest answer ends, and with PEFT prompt and
prefix tuning it numbers positions differently with and without the cache (the virtual
tokens are not counted consistently in transformers 5), so greedy answers changed with
``use_cache``. transformers' own continuous batching (``generate_batch``) does not run
PEFT prompt or prefix models and has no per-request stop strings or streaming callback.

How a row is decoded:
- Prefill: the prompt goes through the *method's own* forward (PEFT's, with its virtual
  tokens or key/value prefix), exactly as in training. Its cache then holds ``n``
  positions, virtual ones included. The prompts admitted in one step go through together,
  left-padded, in forwards of up to ``PREFILL_TOKENS`` padded tokens (sorted by length, at
  most half padding): a matrix of many rows runs the matmuls several times faster per
  token. Prompt and prefix tuning prefill one prompt at a time (virtual tokens first).
- Decode: the rows of one variant share a cache. Each step feeds every row its last token
  at position ``n_i`` (its own cache length, which counts virtual tokens the way training
  did). With eager or flash attention the rows are left-padded to a common end and the
  padding masked; with sdpa a row joins at the cache's start and ends where its own
  tokens end (``Row.lag``), and attention reads, in runs of rows with similar extents
  (``attention.plan_runs``), only each run's columns.
- Continuous batching: a finished row leaves between steps (its cache rows are dropped
  and the common padding trimmed) and a waiting request is prefilled into the free slot.
Rows that use different variants (tuned, base, another run) have a cache each and one
forward each per step, under the variant's context (e.g. PEFT's ``disable_adapter``),
unless the variants share a lane: LoRA rows of the tuned run and of the base differ
only in the low-rank terms, so they decode in one forward whose ``route`` sends
each row through its own adapter (PEFT's mixed adapter batches). A step reads the
weights once instead of once per variant.
- Requests with the same variant and prompt (eval's sampled and greedy answer to one
  prompt) share one prefill row; rows of variants that share a lane prefill in the same
  forwards, under ``route``. A request's followers in the queue with the same prompt are
  admitted with it, up to ``max_batch / 8`` rows over ``max_batch``: admitted one at a time
  as slots free up, eval's four requests of a prompt took up to four prefills, and their
  rows, of different lengths, could not attend in one run.
- Speculative steps: a row may also feed tokens drafted from its history
  (``engine/lookup.py``) and keeps those it would have chosen one step at a time. A step
  with drafts feeds its N tokens as N batch rows of one token each (no padding in the
  matmuls); each row's keys go after its own last position, so a row that kept fewer
  lags behind the cache's end, and attention masks each token to its row's positions up
  to its own (``attention.plan_runs``). Only models that attend through
  ``attention.segment_attention`` (sdpa) draft; eager and flash-attention models decode
  one token a row.
- On a CPU in float32 linear layers run on oneDNN's pre-packed weights (``engine/packed.py``).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from chattune.models import attention
from chattune.engine import cache as kv
from chattune.engine.lane import Lane, Row
from chattune.engine.lookup import DRAFT_TOKENS, Lookup
from chattune.engine.lean import WEIGHTS, prepare_variants
from chattune.engine.requests import Answer, PromptTooLong, Request
from chattune.engine.sampling import choose, noise_seed, penalise
from chattune.engine.step import step_inputs
from chattune.engine.text import TextTracker
from chattune.errors import UserError

PREFILL_TOKENS = 2048  # padded prompt tokens per prefill forward
# Rows over max_batch that a prompt's further requests may take to join with it: an
# eighth of max_batch, at most 3 (none below 8 rows: a batch of one stays one).
GROUP_SLACK = 3


@dataclass
class Variant:
    """One way to run the loaded weights: the tuned run, the base, another adapter.

    ``model`` is called for prefill (its own forward adds virtual tokens or prefixes);
    decode steps call ``model.get_base_model()`` where it exists, under ``context()``.
    """

    model: torch.nn.Module
    context: Callable[[], ContextManager] = contextlib.nullcontext
    virtual_tokens: int = 0  # cache positions the method adds in front of every prompt
    # Variants naming the same ``lane`` (and the same ``model``) decode and prefill their
    # rows in one forward, under ``route(names)``, names being each row's variant; a forward
    # of one variant's rows runs under its ``context``.
    lane: str | None = None
    route: Callable[[list[str]], ContextManager] | None = None

    @property
    def inner(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model


class Engine:
    """Decode many requests at once with continuous batching.

    Args:
        variants: name -> ``Variant``; a request picks one by ``Request.variant``.
        tokenizer: turns answer tokens into text (stop strings, streaming).
        eos_id: the token that ends an answer.
        max_batch: rows decoded together (all variants); further requests wait, but for
            the requests queued right after one with the same prompt, which join with it
            (up to ``max_batch // 8`` rows over, at most ``GROUP_SLACK``).
        dtype: autocast dtype for the forward passes (None: the weights' own).
        draft_tokens: the most tokens a row proposes from its own history and checks in
            the step's forward (``engine/lookup.py``); 0 turns this off.
        lean_steps: decode Llama-family models through the lean step (``engine/lean.py``)
            where it applies; False: always through the model's own forward.
        weights: the precision of the lean step's weight copies: ``float32`` (the
            model's own answers), or ``float16``/``bfloat16`` (half the bytes a step
            reads, answers that may differ: docs/chat-and-export.md). Prefill, and models
            the lean step does not run, stay in the model's precision.
        share: an earlier engine over the same models with the same ``lean_steps`` and
            ``weights`` (chat's previous turn): its packed and fused weight copies are
            taken over instead of made again (they follow weight changes either way).
    """

    def __init__(self, variants: dict[str, Variant], tokenizer, eos_id: int, *, max_batch: int = 16,
                 dtype: torch.dtype | None = None, draft_tokens: int = DRAFT_TOKENS, lean_steps: bool = True,
                 weights: str = "float32", share: "Engine | None" = None):
        if max_batch < 1:
            raise UserError("max_batch must be >= 1")
        if draft_tokens < 0:
            raise UserError("draft_tokens must be >= 0")
        if weights not in WEIGHTS:
            raise UserError(f"unknown decode weights '{weights}'; choose one of {', '.join(WEIGHTS)}")
        self.variants, self.tokenizer, self.eos_id = variants, tokenizer, eos_id
        self.max_batch, self.dtype, self.draft_tokens = max_batch, dtype, draft_tokens
        self.slack = min(GROUP_SLACK, max_batch // 8)
        self.drafted = self.kept = 0  # draft tokens proposed and confirmed, over the engine's life
        first = next(iter(variants.values())).model
        self.device = next(first.parameters()).device
        self.context_size = _context_size(first.config)
        self.waiting: deque[Request] = deque()
        self.lane_of = {name: v.lane or name for name, v in variants.items()}
        self.lanes = {lane: Lane(max_batch + self.slack) for lane in self.lane_of.values()}
        self.finished: list[Answer] = []
        same = share is not None and (share.lean_steps, share.weights) == (lean_steps, weights)
        earlier = share.prepared if same else None
        self.lean_steps, self.weights = lean_steps, weights
        self.prepared, by_name = prepare_variants(variants, lean_steps, WEIGHTS[weights], earlier)
        self.packed = {name: packed for name, (packed, _) in by_name.items()}
        self.lean = {name: lean for name, (_, lean) in by_name.items()}

    # -- public ----------------------------------------------------------------------
    def add(self, request: Request) -> Request:
        """Queue a request; it enters the batch when a slot is free."""
        if request.variant not in self.variants:
            raise UserError(f"unknown variant '{request.variant}'; have {', '.join(self.variants)}")
        if not request.prompt_ids:
            raise UserError("empty prompt")
        if request.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        self.check_length(request)
        self.waiting.append(request)
        return request

    def check_length(self, request: Request) -> None:
        """Raise ``PromptTooLong`` when the prompt leaves no room for an answer in the context."""
        used = len(request.prompt_ids) + self.variants[request.variant].virtual_tokens
        if self.context_size and used >= self.context_size:
            virtual = self.variants[request.variant].virtual_tokens
            extra = f" (+{virtual} virtual tokens)" if virtual else ""
            raise PromptTooLong(f"the prompt has {len(request.prompt_ids)} tokens{extra}; the model's context is "
                                f"{self.context_size} tokens")

    def cancel(self, request: Request) -> None:
        """Stop decoding ``request``: it leaves the batch at the next step (finish_reason 'cancelled')."""
        for lane in self.lanes.values():
            for row in lane.rows:
                if row.req is request:
                    row.cancelled = True
        if request in self.waiting:
            self.waiting.remove(request)
            self.finished.append(Answer(request.tag, "", [], "cancelled", len(request.prompt_ids), request=request))

    @property
    def active(self) -> int:
        return sum(len(lane.rows) for lane in self.lanes.values())

    def has_work(self) -> bool:
        return bool(self.waiting) or self.active > 0

    def step(self) -> list[Answer]:
        """Admit waiting requests into free slots, decode one token for every row; return
        the answers that finished during this step."""
        admitted = []
        while self.waiting and self.active + len(admitted) < self.max_batch:
            admitted.append(self.waiting.popleft())
        # the requests queued right after with the same prompt (eval's sampled and greedy
        # answers, tuned and base) come along, up to ``slack`` rows over max_batch: they
        # share prefill forwards, and rows of one length attend in one run
        while (admitted and self.waiting and self.waiting[0].prompt_ids == admitted[-1].prompt_ids
               and self.active + len(admitted) < self.max_batch + self.slack):
            admitted.append(self.waiting.popleft())
        if admitted:
            self._admit(admitted)
        for lane in self.lanes.values():
            if lane.rows:
                self._decode(lane)
        done, self.finished = self.finished, []
        return done

    def run(self, requests: list[Request]) -> list[Answer]:
        """Decode ``requests`` to the end; answers in the order of ``requests``."""
        for r in requests:
            self.add(r)
        answers: dict[int, Answer] = {}
        by_id = {id(r): i for i, r in enumerate(requests)}
        while self.has_work():
            for a in self.step():
                answers[by_id[id(a.request)]] = a
        return [answers[i] for i in range(len(requests))]

    # -- internals -----------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def _context(self, names: list[str]) -> ContextManager:
        """What a forward over rows of variants ``names`` (one lane) runs under: the lane's
        ``route`` when they mix variants, else the variant's own ``context``."""
        variant = self.variants[names[0]]
        if variant.route is not None and len(set(names)) > 1:
            return variant.route(names)
        return variant.context()

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill ``reqs``: one row per distinct (variant, prompt), in length-sorted chunks.
        Variants that share a lane (LoRA's tuned and base) prefill in the same forwards."""
        by_lane: dict[str, dict[tuple, list[Request]]] = {}
        for r in reqs:
            by_lane.setdefault(self.lane_of[r.variant], {}).setdefault((r.variant, tuple(r.prompt_ids)), []).append(r)
        for by_key in by_lane.values():
            groups = sorted(by_key.values(), key=lambda g: len(g[0].prompt_ids))
            if any(self.variants[g[0].variant].virtual_tokens for g in groups):
                chunks = [[g] for g in groups]
            else:
                chunks, real = [[]], 0
                for g in groups:  # ascending lengths: the chunk's width is its last prompt's length
                    n = len(g[0].prompt_ids)
                    padded = (len(chunks[-1]) + 1) * n
                    if chunks[-1] and (padded > PREFILL_TOKENS or real + n < padded / 2):  # at most half padding
                        chunks.append([])
                        real = 0
                    chunks[-1].append(g)
                    real += n
            for chunk in reversed(chunks):  # widest first: narrower prompts join its cache without a rebuild
                self._prefill(chunk)

    @torch.no_grad()
    def _prefill(self, groups: list[list[Request]]) -> None:
        """One forward over the prompts of ``groups`` (the requests of a group share a variant
        and a prompt; the groups, one lane)."""
        names = [g[0].variant for g in groups]
        variant = self.variants[names[0]]
        prompts = [g[0].prompt_ids for g in groups]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)  # (P, T)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        extra = {}
        if len(prompts) > 1:  # left padding: number the real tokens from 0, as alone
            extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        with self._context(names), self._autocast(), self.packed[names[0]]():
            variant.model.eval()
            out = variant.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **extra)
        cache = out.past_key_values
        virtual = cache.get_seq_length() - width  # positions prompt or prefix tuning put in front
        if virtual and len(groups) > 1:  # a variant that did not declare its virtual tokens: one by one
            for g in groups:
                self._prefill([g])
            return
        logits = out.logits[:, -1, :]  # (P, V)
        joining, index, seen_rows = [], [], []
        for i, group in enumerate(groups):
            length = len(prompts[i]) + virtual
            for req in group:
                budget = min(req.max_new_tokens, self.context_size - length) if self.context_size else req.max_new_tokens
                seed = None
                if not req.sampling.greedy:
                    seed = req.sampling.seed if req.sampling.seed is not None else int(torch.randint(0, 2**62, (1,)))
                row = Row(req, TextTracker(self.tokenizer, req.stop, req.on_text), seed, length, -1, budget,
                           time.perf_counter())
                seen = torch.zeros((1, logits.shape[-1]), dtype=torch.bool, device=self.device)
                token = self._choose(logits[i:i + 1], [row], seen)[0]
                if budget < 1:  # check_length counts virtual tokens; this is a last guard
                    row.done = "length"
                if row.done or self._accept(row, token, seen[0]):
                    self._finish(row)
                    continue
                joining.append(row)
                index.append(i)
                seen_rows.append(seen)
        if joining:  # the lane copies these rows into its own cache: requests never share storage
            same = index == list(range(len(groups)))  # one row per prompt, none finished: take the cache as is
            rows = cache if same else kv.rows(cache, torch.tensor(index, device=self.device))
            self.lanes[self.lane_of[names[0]]].add(joining, rows, torch.cat(seen_rows),
                                                   at_start=attention.attends_in_runs(variant.inner))

    @torch.no_grad()
    def _decode(self, lane: Lane) -> None:
        rows, names = lane.rows, [r.req.variant for r in lane.rows]
        variant, width, device = self.variants[names[0]], lane.width, self.device
        with attention.decode_steps(variant.inner) as ours:
            drafts = [self._draft(r) for r in rows] if ours and self.draft_tokens else [[] for _ in rows]
            step = step_inputs(rows, drafts, width, ours, device)
            if step.flat:
                kv.write(lane.cache, step.writes)
                names = [names[i] for i in step.owners]
            logits = self._forward(variant, names, lane, step, ours)  # (N, V)
        firsts = step.firsts
        chosen = self._choose(logits[firsts] if step.flat else logits, rows, lane.seen)
        # a greedy row without a penalty chooses by its logits alone: its drafts' choices at once
        plain = logits.float().argmax(-1).tolist() if any(d and _plain(r) for r, d in zip(rows, drafts)) else None
        keep, taken = [], []
        for i, (row, token, draft) in enumerate(zip(rows, chosen, drafts)):
            kept = 0  # draft tokens confirmed: their cache positions stay
            while True:  # a choice depends only on the row's history and position (sampling.choose):
                if row.cancelled:  # the answer is the one of one token a step
                    row.done = "cancelled"
                if row.done or self._accept(row, token, lane.seen[i]) or kept == len(draft) or token != draft[kept]:
                    break
                kept += 1
                at = firsts[i] + kept
                token = plain[at] if plain and _plain(row) else self._choose(logits[at:at + 1], [row], lane.seen[i:i + 1])[0]
            if draft:
                self.drafted, self.kept = self.drafted + len(draft), self.kept + kept
                row.lookup.checked(len(draft), kept)
            row.length += 1 + kept
            taken.append(1 + kept)
            if row.done:
                self._finish(row)
            else:
                keep.append(i)
        if step.flat:  # the cache ends after the row that went furthest; the others lag behind it
            moved = max(a - r.lag for r, a in zip(rows, taken))
            kv.advance(lane.cache, moved)
            for r, a in zip(rows, taken):
                r.lag += moved - a
        if len(keep) < len(rows):
            lane.drop(keep)

    def _forward(self, variant: Variant, names: list[str], lane: Lane, step, ours: bool) -> torch.Tensor:
        """The step's logits (N, V): the lean step where it computes what the model's own
        forward does (``engine/lean.py``), else that forward."""
        lean = self.lean[names[0]]
        with self._context(names):
            if lean is not None and ours and self.dtype is None and len(set(names)) == 1 and lean.ready():
                return lean(step.ids, step.positions, lane.cache, step.extra.get("kv_plan"))
            with self._autocast(), self.packed[names[0]]():
                out = variant.inner(input_ids=step.ids, position_ids=step.positions, attention_mask=step.mask,
                                    past_key_values=lane.cache, use_cache=True, **step.extra)
        return out.logits[:, -1, :]

    def _draft(self, row: Row) -> list[int]:
        """Tokens to check along with ``row``'s next one (``engine/lookup.py``): a drafted
        token costs a row of the step's matmuls, a kept one saves the row a whole step."""
        room = min(self.draft_tokens, row.budget - len(row.tokens) - 1)  # the budget stops short of the context
        if room < 1:
            return []
        if row.lookup is None:
            row.lookup = Lookup(row.req.prompt_ids + row.tokens)
        n = row.lookup.wanted(room)
        return row.lookup.draft(n) if n else []

    def _choose(self, logits: torch.Tensor, rows: list[Row], seen: torch.Tensor) -> list[int]:
        logits = logits.float()  # (B, V)
        if any(r.req.sampling.repetition_penalty != 1.0 for r in rows):
            penalty = torch.tensor([[r.req.sampling.repetition_penalty] for r in rows], device=logits.device)
            logits = penalise(logits, seen, penalty)
        seeds = [None if r.seed is None else noise_seed(r.seed, len(r.tokens)) for r in rows]
        return choose(logits, [r.req.sampling for r in rows], seeds)

    def _accept(self, row: Row, token: int, seen: torch.Tensor) -> bool:
        """Record ``token`` for ``row``; True when the row is finished."""
        if token == self.eos_id or token in row.req.end_ids:
            row.done = "eos"
            return True
        if token in row.req.stop_ids:
            row.done = "stop"
            return True
        row.tokens.append(token)
        row.last = token
        seen[token] = True
        if row.lookup is not None:
            row.lookup.add(token)
        if row.text.add(token):
            row.done = "stop"
        elif len(row.tokens) >= row.budget:
            row.done = "length"
        return row.done is not None

    def _finish(self, row: Row) -> None:
        text = row.text.finish() if row.done != "stop" else row.text.text
        self.finished.append(Answer(row.req.tag, text, row.tokens, row.done, len(row.req.prompt_ids),
                                    time.perf_counter() - row.started, row.req))


def _plain(row: Row) -> bool:
    return row.req.sampling.greedy and row.req.sampling.repetition_penalty == 1.0


def _context_size(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

