"""The engine's choice of the next token and of when an answer ends, without a model:
sampling settings, the repetition penalty, temperature/top-k/top-p draws against the
distribution written out, the accept rule (EOS, end and stop ids, budget) and stop strings.

Fast unit tests: ``make mutate`` runs them against every mutant of these functions.
"""

from __future__ import annotations

import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from chattune.engine import DEFAULTS, GREEDY, Engine, Request, SamplingParams
from chattune.engine.lane import Row
from chattune.engine.lookup import Lookup
from chattune.engine.sampling import choose, noise_seed, penalise
from chattune.engine.text import TextTracker
from chattune.errors import UserError
from tiny import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


# -- settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [({"temperature": -0.01}, "temperature must be >= 0"),
                                         ({"top_p": 0.0}, "top_p must be in (0, 1]"),
                                         ({"top_p": 1.01}, "top_p must be in (0, 1]"),
                                         ({"top_k": -1}, "top_k must be >= 0"),
                                         ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0")])
def test_out_of_range_settings_are_user_errors(kw, message):
    with pytest.raises(UserError, match="^" + re.escape(message)):
        SamplingParams(**kw)


def test_edges_of_the_ranges_are_allowed_and_zero_temperature_is_greedy():
    edge = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1e-6)
    assert edge.greedy and not SamplingParams(temperature=1e-6, top_p=1e-6).greedy
    assert SamplingParams() == DEFAULTS == SamplingParams(0.7, 0.9, 50, 1.1, None)
    assert GREEDY == SamplingParams(0.0, 1.0, 0, 1.0, None) and GREEDY.greedy and not DEFAULTS.greedy


def test_with_applies_changes_and_ignores_none():
    changed = DEFAULTS.with_(temperature=0.0, top_p=None, seed=3)
    assert changed == SamplingParams(0.0, 0.9, 50, 1.1, 3) and DEFAULTS.seed is None
    with pytest.raises(UserError):
        DEFAULTS.with_(top_p=2.0)


# -- the repetition penalty -------------------------------------------------------------------
def test_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens_only():
    logits = torch.tensor([[2.0, -2.0, 0.0, 4.0], [2.0, -2.0, 1.0, 4.0]])
    seen = torch.tensor([[True, True, True, False], [False, False, True, False]])
    out = penalise(logits, seen, torch.tensor([[2.0], [4.0]]))
    assert out.tolist() == [[1.0, -4.0, 0.0, 4.0], [2.0, -2.0, 0.25, 4.0]]
    same = penalise(logits, torch.ones_like(seen), torch.ones(2, 1))
    assert torch.equal(same, logits)


def test_noise_seed_is_the_written_formula():
    assert noise_seed(0, 5) == 5
    assert noise_seed(3, 2) == (3 * 0x9E3779B97F4A7C15 + 2) % 2**63
    assert noise_seed(1, 0) != noise_seed(1, 1) != noise_seed(2, 1)
    assert 0 <= noise_seed(2**62, 2**40) < 2**63


# -- choose --------------------------------------------------------------------------------------
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def draws(params: SamplingParams, logits=LOGITS, n: int = 3000) -> Counter:
    """Tokens drawn with seeds 0..n-1: one batch of n identical rows."""
    rows = logits.expand(n, -1).contiguous()
    return Counter(choose(rows, [params] * n, list(range(n))))


def expected(params: SamplingParams, logits=LOGITS) -> torch.Tensor:
    """The distribution written out: logits / T, keep the top k, then the smallest prefix reaching top_p."""
    order = torch.argsort(logits / params.temperature, descending=True)
    probs = torch.softmax(logits[order] / params.temperature, -1)
    k = params.top_k or len(logits)
    probs[k:] = 0
    probs /= probs.sum()
    before = probs.cumsum(-1) - probs
    probs[before >= params.top_p] = 0
    out = torch.zeros_like(probs)
    out[order] = probs / probs.sum()
    return out


@pytest.mark.parametrize("params", [SamplingParams(1.0, 1.0, 0, 1.0), SamplingParams(0.5, 1.0, 0, 1.0),
                                    SamplingParams(2.0, 1.0, 0, 1.0), SamplingParams(1.0, 1.0, 3, 1.0),
                                    SamplingParams(1.0, 0.7, 0, 1.0), SamplingParams(1.5, 0.9, 4, 1.0)],
                         ids=["plain", "cold", "hot", "top_k", "top_p", "all"])
def test_draws_follow_temperature_top_k_and_top_p(params):
    n = 3000
    got = draws(params, n=n)
    want = expected(params)
    for token in range(len(LOGITS)):
        if want[token] == 0:
            assert got[token] == 0, (token, got)
        else:  # 4 standard deviations of a binomial share
            sd = (want[token] * (1 - want[token]) / n) ** 0.5
            assert abs(got[token] / n - want[token]) < 4 * sd + 1e-3, (token, got, want)


def test_top_p_keeps_the_smallest_set_reaching_it_and_always_the_first_token():
    uniform = torch.zeros(4)  # probabilities exactly 0.25: the set's edge is exact
    assert set(draws(SamplingParams(1.0, 0.5, 0, 1.0), uniform, 400)) == {0, 1}
    assert set(draws(SamplingParams(1.0, 0.51, 0, 1.0), uniform, 400)) == {0, 1, 2}
    assert set(draws(SamplingParams(1.0, 1e-6, 0, 1.0), LOGITS, 50)) == {0}
    assert set(draws(SamplingParams(5.0, 1.0, 1, 1.0), LOGITS, 50)) == {0}
    assert set(draws(SamplingParams(5.0, 1.0, 5, 1.0), LOGITS, 400)) == {0, 1, 2, 3, 4}  # k == vocab: off


def test_each_row_keeps_its_own_settings_and_seed_whatever_the_batch():
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS, LOGITS])
    rows = [GREEDY, GREEDY, SamplingParams(50.0, 1.0, 1, 1.0), SamplingParams(50.0, 1.0, 0, 1.0)]
    out = [choose(logits, rows, [None, None, s, s]) for s in range(60)]
    assert {o[0] for o in out} == {0} and {o[1] for o in out} == {4} and {o[2] for o in out} == {0}
    assert len({o[3] for o in out}) == 5  # top_k 0 is off, even beside a row limiting k
    hot = SamplingParams(1.0, 1.0, 0, 1.0)
    for seed in range(20):
        alone = choose(LOGITS[None], [hot], [seed])
        assert choose(torch.stack([LOGITS.flip(0), LOGITS]), [hot, hot], [seed + 1, seed])[1:] == alone
        assert choose(LOGITS[None], [hot], [seed]) == alone


def test_greedy_rows_take_the_argmax_and_ignore_the_seed():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 4.9]])
    assert choose(logits, [GREEDY, GREEDY], [123, None]) == [1, 0]


def test_a_seeded_draw_is_gumbel_max_with_float64_noise_from_its_seed():
    # The seeded stream is part of what a seed promises: eval reports (docs/evaluation.md)
    # are seeded, so drawing the noise differently (float32) would change every figure.
    hot = SamplingParams(1.0, 1.0, 0, 1.0)
    order = torch.argsort(LOGITS, descending=True)
    logp = torch.log_softmax(LOGITS[order], -1)
    for seed in range(200):
        u = torch.rand(len(LOGITS), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u)).float()
        assert choose(LOGITS[None], [hot], [seed]) == [int(order[int((logp + gumbel).argmax())])], seed


def test_every_tensor_choose_makes_sits_on_the_logits_device():
    # A CUDA batch must never meet a CPU tensor. With the default device moved elsewhere
    # (meta), any tensor made without device=logits.device breaks the draw on the CPU too.
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS])
    rows = [SamplingParams(1.0, 0.9, 3, 1.0), SamplingParams(2.0, 1.0, 0, 1.0), GREEDY]
    for seeds in ([1, 2, None], [7, 8, None]):
        want = choose(logits, rows, seeds)
        with torch.device("meta"):
            assert choose(logits, rows, seeds) == want



def test_the_seeded_generator_is_made_on_the_logits_device(monkeypatch):
    # torch.rand refuses a CPU generator for a CUDA tensor, and a generator made without a
    # device does not follow the default device, so the meta check above cannot see it:
    # record the device each generator is asked for instead.
    import chattune.engine.sampling as sampling

    asked, real = [], torch.Generator

    def generator(*args, **kw):
        asked.append(kw.get("device", args[0] if args else None))
        return real(*args, **kw)

    monkeypatch.setattr(sampling.torch, "Generator", generator)
    choose(LOGITS[None], [SamplingParams(1.0, 0.9, 3, 1.0)], [5])
    assert asked and all(d is not None and torch.device(d) == LOGITS.device for d in asked)

# -- accepting a token -------------------------------------------------------------------------
EOS = 9


def row(tokenizer, budget: int = 5, stop: list[str] | None = None, end_ids=(), stop_ids=()) -> Row:
    req = Request([1, 2], budget, GREEDY, stop=stop or [], end_ids=end_ids, stop_ids=stop_ids)
    return Row(req, TextTracker(tokenizer, req.stop), None, 2, -1, budget, 0.0)


def accept(r: Row, token: int, seen: torch.Tensor) -> bool:
    return Engine._accept(SimpleNamespace(eos_id=EOS), r, token, seen)


def test_eos_and_end_ids_finish_as_eos_unrecorded_and_unseen(tokenizer):
    for token, kw in ((EOS, {}), (7, {"end_ids": (7,)})):
        r, seen = row(tokenizer, **kw), torch.zeros(50, dtype=torch.bool)
        assert accept(r, 20, seen) is False and r.done is None
        assert accept(r, token, seen) is True
        assert r.done == "eos" and r.tokens == [20] and r.last == 20 and seen.nonzero().flatten().tolist() == [20]


def test_stop_ids_finish_as_stop_unrecorded(tokenizer):
    r, seen = row(tokenizer, stop_ids=(8,)), torch.zeros(50, dtype=torch.bool)
    assert accept(r, 8, seen) is True and r.done == "stop" and r.tokens == [] and not seen.any()


def test_the_budget_finishes_as_length_on_its_last_token(tokenizer):
    r, seen = row(tokenizer, budget=3), torch.zeros(50, dtype=torch.bool)
    assert [accept(r, t, seen) for t in (20, 21, 22)] == [False, False, True]
    assert r.done == "length" and r.tokens == [20, 21, 22] and seen.sum() == 3


def test_a_stop_string_finishes_as_stop(tokenizer):
    ids = tokenizer("ok ### Human: more", add_special_tokens=False)["input_ids"]
    r, seen = row(tokenizer, budget=100, stop=["### Human:"]), torch.zeros(len(tokenizer), dtype=torch.bool)
    for k, token in enumerate(ids):
        if accept(r, token, seen):
            break
    assert r.done == "stop" and r.text.text == "ok " and r.tokens == ids[:k + 1]


# -- stop strings and streaming -----------------------------------------------------------------
def feed(tokenizer, text: str, stops: list[str]) -> tuple[TextTracker, list[str], bool]:
    parts: list[str] = []
    tracker = TextTracker(tokenizer, stops, parts.append)
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if tracker.add(token):
            return tracker, parts, True
    return tracker, parts, False


def test_the_earliest_stop_string_cuts_and_nothing_of_it_is_streamed(tokenizer):
    tracker, parts, stopped = feed(tokenizer, "one two; three", ["three", "two", ""])
    assert stopped and tracker.text == "one " == "".join(parts)


def test_a_possible_stop_prefix_is_held_back_then_released(tokenizer):
    tracker, parts, stopped = feed(tokenizer, "a b ### Hu", ["### Human:"])
    assert not stopped and "".join(parts) == "a b "  # '### Hu' may still become the marker
    assert tracker.finish() == "a b ### Hu" and "".join(parts) == "a b ### Hu"


def test_without_stops_everything_streams_and_multibyte_characters_arrive_whole(tokenizer):
    text = "café ünïcode ✓ done"
    tracker, parts, stopped = feed(tokenizer, text, [])
    assert not stopped and all("\ufffd" not in p for p in parts)
    assert "".join(parts) == text == tracker.finish()


def test_accepted_tokens_feed_the_rows_draft_lookup(tokenizer):
    r, seen = row(tokenizer, budget=10), torch.zeros(50, dtype=torch.bool)
    r.lookup = Lookup([1, 2, 3, 4])
    accept(r, 2, seen)  # 1 2 3 4 2: after 2 came 3 4 before
    assert r.lookup.history == [1, 2, 3, 4, 2] and r.lookup.draft(2) == [3, 4]


class Pieces:
    """A stand-in tokenizer: token i is ``pieces[i]``; ids >= 100 are special tokens."""

    def __init__(self, *pieces: str):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False):
        return "".join("<s>" if i >= 100 and not skip_special_tokens else "" if i >= 100 else self.pieces[i]
                       for i in ids)


def track(pieces: Pieces, ids: list[int], stops: list[str]) -> tuple[TextTracker, list[str], list[bool]]:
    parts: list[str] = []
    tracker, stopped = TextTracker(pieces, stops, parts.append), []
    for i in ids:
        stopped.append(tracker.add(i))
        if stopped[-1]:
            break
    return tracker, parts, stopped


def test_a_stop_string_at_the_very_start_cuts_everything():
    tracker, parts, stopped = track(Pieces("##", "x"), [0, 1], ["##"])
    assert stopped == [True] and tracker.text == "" and parts == []


def test_the_first_occurrence_in_one_token_is_where_the_answer_ends():
    tracker, parts, stopped = track(Pieces("a", "b!c!d"), [0, 1], ["!"])
    assert stopped == [False, True] and tracker.text == "ab" == "".join(parts)


def test_special_tokens_are_not_text_and_no_empty_delta_is_streamed():
    tracker, parts, stopped = track(Pieces("a", "b"), [0, 100, 1, 100], ["zz"])
    assert not any(stopped) and tracker.finish() == "ab" and parts == ["a", "b"]
