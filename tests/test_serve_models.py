"""Several runs of every method on one base: each variant answers exactly as its run alone."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from chattune.cli import main
from chattune.engine import GREEDY, Engine
from chattune.generate.loaded import load_run
from chattune.errors import UserError
from chattune.serve.models import BASE, load_served, parse_specs
from tiny import tiny_dirs  # noqa: F401  (fixture)

METHODS = ["lora", "dora", "ia3", "prompt", "prefix", "adapter"]
CONV = [{"role": "user", "content": "What is the capital of Italy?"}]


def test_run_names_from_the_command_line():
    assert parse_specs(["runs/a", "b=runs/x"]) == {"a": Path("runs/a"), "b": Path("runs/x")}
    with pytest.raises(UserError, match="two runs are named 'a'"):
        parse_specs(["runs/a", "a=other"])
    with pytest.raises(UserError, match="names the base model"):
        parse_specs(["base=runs/a"])


@pytest.mark.slow
def test_every_method_on_one_base_answers_as_alone(tiny_dirs, tmp_path):
    dirs = {}
    for i, method in enumerate(METHODS + ["lora"]):
        name = f"{method}{i}"
        dirs[name] = tmp_path / name
        assert main(["train", "--model", str(tiny_dirs["gpt2"]), "--method", method, "--max-steps", "2", "--lr", "0.05",
                     "--output-dir", str(dirs[name]), "--max-length", "128", "--seed", str(i)]) == 0
    served = load_served([f"{n}={p}" for n, p in dirs.items()])
    first = served.runs["lora0"]
    engine = Engine(served.variants, served.tokenizer, served.tokenizer.eos_token_id, max_batch=16)
    requests = [(served.runs.get(n) or first).request(CONV, max_new_tokens=12, sampling=GREEDY, variant=n)
                for n in served.names]
    together = {n: a for n, a in zip(served.names, engine.run(requests))}  # one batch, every variant
    logits = {}
    for name in served.names:
        alone = load_run(dirs[name if name != BASE else "lora0"])
        variant = "base" if name == BASE else "tuned"
        expected = alone.engine().run([alone.request(CONV, max_new_tokens=12, sampling=GREEDY, variant=variant)])[0]
        assert together[name].token_ids == expected.token_ids, name
        ids = torch.tensor([requests[served.names.index(name)].prompt_ids])
        with torch.no_grad(), served.variants[name].context():
            logits[name] = served.variants[name].model(input_ids=ids).logits[0, -1]
        with torch.no_grad(), (alone.base() if name == BASE else nullcontext(alone.model)) as model:
            torch.testing.assert_close(logits[name], model(input_ids=ids).logits[0, -1], rtol=0, atol=1e-5)
    for name in served.runs:  # every method really is switched on for its own run only
        assert not torch.allclose(logits[name], logits[BASE]), name


def test_lora_runs_and_base_share_one_forward_and_answer_as_alone(tiny_dirs, tmp_path):
    dirs = {}
    for i in range(2):
        dirs[f"lora{i}"] = tmp_path / f"lora{i}"
        assert main(["train", "--model", str(tiny_dirs["gpt2"]), "--method", "lora", "--max-steps", "2", "--lr", "0.05",
                     "--output-dir", str(dirs[f"lora{i}"]), "--max-length", "128", "--seed", str(i)]) == 0
    served = load_served([f"{n}={p}" for n, p in dirs.items()])
    assert {v.lane for v in served.variants.values()} == {"lora"}
    run = served.runs["lora0"]
    engine = Engine(served.variants, served.tokenizer, served.tokenizer.eos_token_id, max_batch=8)
    requests = [run.request(CONV, max_new_tokens=10, sampling=GREEDY, variant=n) for n in served.names]
    inner = served.variants[BASE].model
    calls = []
    hook = inner.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        together = dict(zip(served.names, engine.run(requests)))
    finally:
        hook.remove()
    # the decode steps: three rows (two runs and base), one forward (of more batch rows when rows check drafts)
    assert sum(n >= 3 for n in calls) >= 8
    for name in served.names:
        alone = load_run(dirs[name if name != BASE else "lora0"])
        variant = "base" if name == BASE else "tuned"
        expected = alone.engine(base=variant == "base").run(
            [alone.request(CONV, max_new_tokens=10, sampling=GREEDY, variant=variant)])[0]
        assert together[name].token_ids == expected.token_ids, name
    # one routed forward gives each row its own run's logits, and the runs differ
    ids = torch.tensor([requests[0].prompt_ids] * 3)
    route = served.variants[BASE].route
    with torch.no_grad():
        with route(served.names):
            mixed = inner(input_ids=ids).logits[:, -1]
        for i, name in enumerate(served.names):
            with served.variants[name].context():
                torch.testing.assert_close(mixed[i], inner(input_ids=ids[:1]).logits[0, -1], rtol=0, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[2]) and not torch.allclose(mixed[0], mixed[1])
