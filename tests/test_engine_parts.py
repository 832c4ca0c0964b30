"""The decoding engine's parts on their own: prompt-lookup drafts (engine/lookup.py),
decode attention in runs of rows (chattune/attention.py) and the packed linear layers
(engine/packed.py). tests/test_engine.py checks them inside whole decodes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny import make_model, make_tokenizer

ARCHS = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_lookup_drafts_what_followed_the_latest_occurrence():
    from chattune.engine.lookup import Lookup

    index = Lookup([1, 2, 3, 4, 9, 2, 3, 5, 6, 7])
    assert index.draft() == []  # 7 never occurred before
    index.add(2)
    index.add(3)
    assert index.draft(3) == [5, 6, 7]  # "2 3" last continued with 5 (not the older 4)
    index.add(4)
    assert index.draft(2) == [9, 2]  # "2 3 4" beats the shorter suffixes
    assert Lookup([5]).draft() == []
    # a continuation that reaches the end goes on copying itself: a loop predicts itself
    assert Lookup([4, 5, 6, 5, 6]).draft(5) == [5, 6, 5, 6, 5]
    assert Lookup([3, 9, 9]).draft(3) == [9, 9, 9]


def test_rows_whose_drafts_are_rejected_draft_less_and_runs_of_kept_ones_draft_more():
    from chattune.engine import lookup

    index = lookup.Lookup([1, 2, 3])
    assert index.wanted() == lookup.MIN_DRAFT
    for _ in range(3):
        index.checked(2, 0)
    assert [index.wanted() for _ in range(lookup.PROBE_EVERY)] == [0] * (lookup.PROBE_EVERY - 1) + [lookup.MIN_DRAFT]
    index.checked(2, 2)  # the probe was kept: drafts again, more
    assert index.wanted() == 5
    index.checked(5, 5)
    assert index.wanted() == lookup.DRAFT_TOKENS and index.wanted(3) == 3  # at most the limit


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_decode_attention_equals_transformers_sdpa(heads):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from chattune.models import attention

    h, hkv = heads
    torch.manual_seed(0)
    query, key, value = torch.randn(3, h, 1, 8), torch.randn(3, hkv, 7, 8), torch.randn(3, hkv, 7, 8)
    mask = (torch.arange(7)[None, :] >= torch.tensor([0, 2, 5])[:, None])[:, None, None, :]  # left padding (B, 1, 1, L)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = h // hkv, True, False
    for m in (mask, None):
        want, _ = sdpa_attention_forward(module, query, key, value, m, scaling=0.3)
        got, _ = attention.segment_attention(module, query, key, value, m, scaling=0.3)
        torch.testing.assert_close(got, want)

    # in runs of rows (attention.plan_runs), whatever the padded positions hold
    starts = [0, 2, 5]
    garbage_key, garbage_value = key.clone(), value.clone()
    for i, s in enumerate(starts):
        garbage_key[i, :, :s], garbage_value[i, :, :s] = 1e4, -1e4
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    for cost in (0, 10**9, attention.CALL_COST):  # row by row, one masked run, as planned
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(attention, "CALL_COST", cost)
            plan = attention.plan_runs(starts, [7] * 3)
        got, _ = attention.segment_attention(module, query, garbage_key, garbage_value, None, scaling=0.3, kv_plan=plan)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cost", [0, 10**9, None], ids=["row_by_row", "one_run", "planned"])
def test_flat_tokens_of_rows_feeding_several_attend_up_to_their_own_positions(cost):
    """A step where rows check drafts: N flat tokens, rows ending apart (rows that kept fewer
    drafts lag); each token sees its row's real positions up to its own, as sdpa of that
    token alone over them would."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from chattune.models import attention

    h, hkv, d, width = 4, 2, 8, 12
    counts, starts, ends = [1, 3, 2], [0, 4, 2], [9, 12, 7]  # row i's tokens: the last counts[i] of its positions
    torch.manual_seed(0)
    key, value = torch.randn(3, hkv, width, d), torch.randn(3, hkv, width, d)
    for i, (s, e) in enumerate(zip(starts, ends)):  # outside a row's positions: garbage
        key[i, :, :s], key[i, :, e:], value[i, :, :s], value[i, :, e:] = 1e4, -1e4, -1e4, 1e4
    query = torch.randn(sum(counts), h, 1, d)
    want, k = [], 0
    for i, c in enumerate(counts):
        for j in range(c):
            own = ends[i] - c + j  # this token's position
            keys, values = repeat_kv(key[i:i + 1, :, starts[i]:own + 1], h // hkv), repeat_kv(value[i:i + 1, :, starts[i]:own + 1], h // hkv)
            want.append(F.scaled_dot_product_attention(query[k:k + 1], keys, values, scale=0.3).transpose(1, 2))
            k += 1
    want = torch.cat(want)  # (N, 1, H, D)
    with pytest.MonkeyPatch.context() as mp:
        if cost is not None:
            mp.setattr(attention, "CALL_COST", cost)
        plan = attention.plan_runs(starts, ends, tokens=counts)
    assert len(plan.runs) == {0: 3, 10**9: 1, None: len(plan.runs)}[cost]
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = h // hkv, True, False
    got, _ = attention.segment_attention(module, query, key, value, None, scaling=0.3, kv_plan=plan)
    torch.testing.assert_close(got, want)


def test_plan_runs_groups_rows_of_like_length_and_leaves_a_long_row_out():
    from chattune.models import attention

    # rows 0-3 share a prompt (one start), row 4 is 1,500 positions longer, rows 5-6 close
    starts = [1500, 1500, 1500, 1500, 0, 1480, 1490]
    ends = [2000] * 7
    runs = attention.plan_runs(starts, ends).runs
    assert [(r.first, r.end) for r in runs] == [(0, 4), (4, 5), (5, 7)]
    assert runs[0].keep is None and runs[0].start == 1500  # one start: nothing to mask
    assert runs[1].start == 0 and runs[1].keep is None
    assert runs[2].start == 1480 and runs[2].keep[:, 0, 0, :].sum(-1).tolist() == [520, 510]  # the real positions
    # without a call's overhead rows go one by one; with a huge one, all in one run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "CALL_COST", 0)
        mp.setattr(attention, "ALONE_COST", 1.0)
        assert len(attention.plan_runs(starts, ends).runs) == 7
        mp.setattr(attention, "CALL_COST", 10**9)
        assert [(r.first, r.end) for r in attention.plan_runs(starts, ends).runs] == [(0, 7)]
    # a row that ends 1,000 positions early (it lags: kept fewer drafts) is a run of its own
    runs = attention.plan_runs([0] * 5, [2000, 2000, 1000, 2000, 2000]).runs
    assert [(r.first, r.end) for r in runs] == [(0, 2), (2, 3), (3, 5)] and runs[1].stop == 1000
    # a row checking 8 drafts does not make its neighbours read as 9 queries each
    plan = attention.plan_runs([0] * 5, [2000] * 5, tokens=[1, 1, 9, 1, 1])
    assert [(r.first, r.end, r.tokens) for r in plan.runs] == [(0, 2, 1), (2, 3, 9), (3, 5, 1)]
    assert plan.scatter.tolist() == [0, 1] + list(range(2, 11)) + [11, 12]


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_linears_give_the_linear_outputs_and_follow_weight_changes(arch, tokenizer, monkeypatch):
    from chattune.engine import packed

    monkeypatch.setattr(packed, "MIN_ELEMENTS", 0)
    model = make_model(arch, len(tokenizer)).eval()
    pack = packed.PackedLinears(model)
    head = model.get_output_embeddings()
    assert head in pack.modules and len(pack.modules) > 1
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with pack():
            assert all("forward" in m.__dict__ for m in pack.modules)  # the swap happened: packed kernels ran
            got = model(input_ids=ids).logits
        assert not any("forward" in m.__dict__ for m in pack.modules)  # restored
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        head.weight.mul_(2)  # trained in place between two evaluations: packed again
        with pack():
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    with pack():  # gradients on (training): the plain layers, untouched
        assert not any("forward" in m.__dict__ for m in pack.modules)
    monkeypatch.setattr(packed, "MIN_ELEMENTS", 10**9)  # every weight below the size that pays
    assert packed.PackedLinears(model).modules == []


def test_draft_replay_counts_the_steps_a_loop_saves():
    """benchmarks/draft_replay.py replays answers through the engine's own draft policy."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import draft_replay

    loop = [7, 8, 9] * 40
    steps, fed = draft_replay.replay([1, 2, 3], loop, 8)
    assert steps < len(loop) / 4 and fed >= len(loop)  # a loop is drafted and kept, up to 9 tokens a step
    assert draft_replay.replay([1, 2, 3], list(range(10, 130)), 8) == (120, 120)  # nothing repeats: no drafts
    assert draft_replay.replay([1, 2, 3], loop, 0) == (120, 120)
