"""``chattune export --format gguf``: every mergeable method on tiny GPT-2 and Llama, read back
through transformers' own GGUF reader (the path chattune loads its built-in model with).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from conftest import CHATML
from gguf_runs import trained_runs  # noqa: F401  (the `runs` fixture)
from tiny import make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from chattune.cli import main
from chattune.data import render_prompt_ids
from chattune.data.render import turn_pieces
from chattune.errors import UserError
from chattune.generate.gguf_files import markup
from chattune.generate.gguf_tensors import QuantSummary, encode, gguf_arch
from chattune.generate.gguf_vocab import pre_tokenizer_name
from chattune.generate.loaded import load_run

MERGEABLE = ["lora", "dora", "ia3", "full"]
ARCHS = ["gpt2", "llama"]
CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "And of Italy, in one word?"}]
# Measured on these tiny random models (max |logit| ~6.4): f16 0.14%, q8_0 2.6% of the largest logit.
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "q8_0": 6e-2}  # x max |logit|, except f32: absolute


def export(run: Path, out: Path, *flags: str) -> Path:
    assert main(["export", str(run), str(out), "--format", "gguf", *flags]) == 0
    return out


def metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def greedy(model, ids: list[int], n: int = 12) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_gguf_reads_back_as_the_merged_model(method, arch, runs, tmp_path, capsys):
    out = export(runs(method, arch), tmp_path / "out", "--quant", "f32")
    said = capsys.readouterr().out
    assert "model.gguf" in said and "tensors" in said and "ollama create" in said
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "model.gguf"]
    run = load_run(runs(method, arch))
    merged = run.method.merge(run.model).eval()
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    x = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, merged(input_ids=x).logits, rtol=0, atol=TOLERANCE["f32"])
        prompt = render_prompt_ids(CHAT, run.tokenizer, run.cfg.data.template)
        assert greedy(back, prompt) == greedy(merged, prompt)
    # the tokenizer round-trips: a chat rendering gives the same ids
    tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)["input_ids"] == prompt
    meta = metadata(out / "model.gguf")
    assert meta["general.architecture"] == arch
    assert meta["tokenizer.chat_template"].startswith("{% for m in messages %}")
    assert meta["tokenizer.ggml.eos_token_id"] == run.tokenizer.eos_token_id


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_quantized_logits_within_stated_tolerance(quant, arch, runs, tmp_path):
    out = export(runs("lora", arch), tmp_path / "out", "--quant", quant)
    run = load_run(runs("lora", arch))
    merged = run.method.merge(run.model).eval()
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    x = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = merged(input_ids=x).logits, back(input_ids=x).logits
    err = (got - want).abs().max().item()
    assert 0 < err <= TOLERANCE[quant] * want.abs().max().item()
    types = {t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types == {quant.upper(), "F32"}  # norms and biases stay f32


@pytest.mark.parametrize("quant", ["bf16", "q4_0"])
def test_other_precisions_load(quant, runs, tmp_path):
    out = export(runs("lora", "llama"), tmp_path / "out", "--quant", quant)
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    assert torch.isfinite(back(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
    assert quant.upper() in {t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}


def test_row_length_off_the_block_falls_back_to_f16():
    summary = QuantSummary()
    assert encode("blk.0.ffn_up.weight", np.ones((4, 48), np.float32), "q8_0", summary)[1] == gguf.GGMLQuantizationType.F16
    assert encode("blk.0.ffn_up.weight", np.ones((4, 64), np.float32), "q8_0", summary)[1] == gguf.GGMLQuantizationType.Q8_0
    assert encode("output_norm.weight", np.ones(64, np.float32), "q8_0", summary)[1] == gguf.GGMLQuantizationType.F32
    assert summary.fell_back == ["blk.0.ffn_up.weight"] and "1 fell back to f16" in str(summary)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_adapter_file_plus_base_is_the_merged_model(arch, runs, tmp_path):
    """W + alpha/r * B @ A, computed from base.gguf and adapter.gguf as llama.cpp does, equals
    the merged export tensor by tensor (so B carries the same q/k row permutation as W)."""
    run_dir = runs("lora", arch)
    adapter = export(run_dir, tmp_path / "a", "--quant", "f32", "--adapter-only")
    merged = export(run_dir, tmp_path / "m", "--quant", "f32")
    assert sorted(p.name for p in adapter.iterdir()) == ["Modelfile", "README.md", "adapter.gguf", "base.gguf"]
    meta = metadata(adapter / "adapter.gguf")
    assert (meta["general.type"], meta["adapter.type"], meta["general.architecture"]) == ("adapter", "lora", arch)
    assert gguf.GGUFReader(adapter / "adapter.gguf").fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(adapter / "adapter.gguf").tensors}
    base = {t.name: np.array(t.data) for t in gguf.GGUFReader(adapter / "base.gguf").tensors}
    want = {t.name: np.array(t.data) for t in gguf.GGUFReader(merged / "model.gguf").tensors}
    targets = sorted(n.removesuffix(".lora_a") for n in tensors if n.endswith(".lora_a"))
    assert targets and all(n.endswith((".attn_q.weight", ".attn_v.weight", ".attn_qkv.weight")) for n in targets)
    for name in targets:
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        np.testing.assert_allclose(base[name] + meta["adapter.lora.alpha"] / a.shape[0] * b @ a, want[name], atol=1e-6)
    assert "ADAPTER ./adapter.gguf" in (adapter / "Modelfile").read_text()


def test_seed_modelfile_and_template(runs, tmp_path):
    out = export(runs("lora", "llama"), tmp_path / "out")
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"")
    for line in ['PARAMETER stop "### Human:"', 'PARAMETER stop "<|endoftext|>"', "PARAMETER temperature 0.7",
                 "PARAMETER top_p 0.9", "PARAMETER top_k 50", "PARAMETER repeat_penalty 1.1"]:
        assert line in text
    readme = (out / "README.md").read_text()
    assert "ollama create" in readme and "llama-server -m model.gguf --jinja" in readme


def test_chat_template_run_writes_its_template_and_end_of_turn(runs, tmp_path):
    run = load_run(runs("lora", "llama", True))
    out = export(run.run_dir, tmp_path / "out", "--quant", "f32")
    meta = metadata(out / "model.gguf")
    assert meta["tokenizer.chat_template"] == CHATML
    assert meta["tokenizer.ggml.eot_token_id"] == run.tokenizer.convert_tokens_to_ids("<|im_end|>")
    stops = [line for line in (out / "Modelfile").read_text().splitlines() if line.startswith("PARAMETER stop")]
    assert 'PARAMETER stop "<|im_end|>"' in stops and 'PARAMETER stop "<|im_start|>"' in stops
    # the Modelfile's template is chattune's rendering, piece for piece
    pieces = "".join(t for prompt, answer in turn_pieces(CHAT, run.tokenizer, "auto") for t, _ in prompt + answer)
    assert markup(run.tokenizer, "auto").render(CHAT) == pieces
    tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    assert tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)["input_ids"] == \
        render_prompt_ids(CHAT, run.tokenizer, "auto")


@pytest.mark.parametrize("method", ["prompt", "prefix", "adapter"])
def test_unmergeable_methods_are_refused_in_one_line(method, runs, tmp_path, capsys):
    """Refused from the run's config, before any weights load: a LoRA run relabelled will do."""
    run = tmp_path / "run"
    shutil.copytree(runs("lora", "llama"), run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["method"]["name"] = method
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "o"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chattune serve" in err and "GGUF cannot express" in err
    assert not (tmp_path / "o").exists()


def test_bad_inputs_exit_2_without_leftovers(runs, tmp_path, capsys, monkeypatch):
    run = runs("dora", "llama")
    capsys.readouterr()
    cases = [
        (["export", str(tmp_path), str(tmp_path / "o"), "--format", "gguf"], "not a finished chattune run"),
        (["export", str(run), str(tmp_path / "o"), "--format", "gguf", "--adapter-only"], "--adapter-only"),
        (["export", str(run), str(tmp_path / "o"), "--quant", "q8_0"], "apply to --format gguf"),
        (["export", str(run), str(Path(run) / "adapter"), "--format", "gguf"], "not empty"),
    ]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    parent = tmp_path / "disk"
    assert main(["export", str(run), str(parent / "o"), "--format", "gguf"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(parent.iterdir()) == []  # neither OUT nor the temporary directory


def test_unsupported_architecture_and_tokenizer_are_named():
    from transformers import OPTConfig

    with pytest.raises(UserError, match="supports gpt2, llama, mistral"):
        gguf_arch(OPTConfig())
    tok = make_tokenizer()
    assert pre_tokenizer_name(tok) == "gpt-2"  # llama.cpp's name (llama-vocab.cpp)
    spec = json.loads(tok.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, dict(spec["pre_tokenizer"])]}
    tok.backend_tokenizer.pre_tokenizer = type(tok.backend_tokenizer).from_str(json.dumps(spec)).pre_tokenizer
    assert pre_tokenizer_name(tok) == "smollm"
    tok.backend_tokenizer.pre_tokenizer = None
    with pytest.raises(UserError, match="byte-level BPE"):
        pre_tokenizer_name(tok)


def test_unwritable_output_directory(runs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where OUT's parent directory should be (works as root too)
    run = runs("lora", "llama")
    capsys.readouterr()
    assert main(["export", str(run), str(blocker / "o"), "--format", "gguf"]) == 2
    assert "cannot write to" in capsys.readouterr().err
