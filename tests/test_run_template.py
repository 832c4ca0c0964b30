"""A run's template reaches decoding: its prompt, its stop strings and the token that ends an answer."""

from __future__ import annotations

import pytest

from chattune.data import DataConfig
from chattune.generate.loaded import LoadedRun
from chattune.training.settings import RunConfig
from conftest import build_model


@pytest.mark.parametrize("template, end, stops", [
    ("auto", "<|im_end|>", []), ("chat", "<|im_end|>", []),
    ("seed", "<|endoftext|>", ["### Human:", "### Assistant:"]),
])
def test_engine_ends_answers_at_the_templates_end_of_turn(tiny_tokenizer, template, end, stops):
    run = LoadedRun(RunConfig(data=DataConfig(template=template)), build_model("gpt2", len(tiny_tokenizer)),
                    tiny_tokenizer, None, None)
    request = run.request([{"role": "user", "content": "Hi"}], max_new_tokens=4)
    # the template's end-of-turn token ends the answer (Request.end_ids), else the engine's EOS
    assert (request.end_ids or (run.engine(base=False).eos_id,))[0] == tiny_tokenizer.convert_tokens_to_ids(end)
    assert request.stop == stops
    text = tiny_tokenizer.decode(request.prompt_ids)
    assert text.endswith("<|im_start|>assistant\n" if template != "seed" else "### Assistant:\n")
