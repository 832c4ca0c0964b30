"""llama.cpp itself reads the exported GGUF: greedy answers are chattune's engine's tokens.

Runs whenever ``llama_cpp`` (the ``llamacpp`` extra, llama-cpp-python) imports; CI installs
it (``make llamacpp``, docs/gguf.md) and sets ``CHATTUNE_REQUIRE_LLAMACPP=1`` so a missing
build fails there instead of skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from gguf_runs import trained_runs  # noqa: F401  (the `runs` fixture)

from chattune.cli import main
from chattune.data.render import turn_pieces
from chattune.engine import GREEDY
from chattune.generate.gguf_vocab import adds_bos
from chattune.generate.loaded import load_run

if os.environ.get("CHATTUNE_REQUIRE_LLAMACPP"):
    import llama_cpp
else:
    llama_cpp = pytest.importorskip("llama_cpp")

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about cats."}],
]
NEW_TOKENS = 24


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) == n:
            break
    return out


def assert_same_answers(run, model_path: Path, lora_path: Path | None = None) -> None:
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
                          n_ctx=512, n_threads=2, verbose=False)
    engine = run.engine(base=False, max_batch=1)
    template = run.cfg.data.template
    for conversation in PROMPTS:
        request = run.request(conversation, max_new_tokens=NEW_TOKENS, sampling=GREEDY)
        # llama.cpp tokenizes the rendered prompt as one string (special tokens parsed)
        text = "".join(t for prompt, answer in turn_pieces(conversation, run.tokenizer, template)
                       for t, _ in prompt + answer)
        assert llm.tokenize(text.encode(), add_bos=adds_bos(run.tokenizer, template), special=True) == request.prompt_ids
        answer = engine.run([request])[0]
        got = llama_greedy(llm, request.prompt_ids, NEW_TOKENS)
        assert got[:len(answer.token_ids)] == answer.token_ids, (conversation, answer.finish_reason)
        if answer.finish_reason == "eos":  # the engine stopped at EOS or the end-of-turn token: so does llama.cpp
            assert got[len(answer.token_ids)] in {run.tokenizer.eos_token_id, *request.end_ids}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_llamacpp_greedy_matches_the_engine_merged_and_with_adapter(arch, runs, tmp_path):
    run_dir = runs("lora", arch)
    merged, adapter = tmp_path / "m", tmp_path / "a"
    assert main(["export", str(run_dir), str(merged), "--format", "gguf", "--quant", "f32"]) == 0
    assert main(["export", str(run_dir), str(adapter), "--format", "gguf", "--quant", "f32", "--adapter-only"]) == 0
    run = load_run(run_dir)
    assert_same_answers(run, merged / "model.gguf")
    assert_same_answers(run, adapter / "base.gguf", adapter / "adapter.gguf")


def test_llamacpp_reads_a_chat_template_run(runs, tmp_path):
    run_dir = runs("dora", "llama", True)
    assert main(["export", str(run_dir), str(tmp_path / "m"), "--format", "gguf", "--quant", "f32"]) == 0
    assert_same_answers(load_run(run_dir), tmp_path / "m" / "model.gguf")
