"""The child processes of ``throughput.py``: one system, or the shared evaluation, per process.

    python benchmarks/_systems.py {seed,trl,evaluate} SPEC.json OUT.json

Each reads the run's spec (model directory, data files, steps, packing length) and writes
its figures to OUT.json. chattune itself is not here: it runs through its own CLI.

Timing is the same for every system: the clock reads at the end of each optimiser step
(HF ``on_step_end``; chattune's per-step ``metrics.jsonl`` window), so a step's time covers
fetching and collating its batch, forward, backward and the optimiser. Tokens are counted
from the batch each step actually received.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

SEED_USER, SEED_ASSISTANT = "### Human:\n", "\n\n### Assistant:\n"  # the seed notebook's text format
SEED_MAX_LENGTH, SEED_BATCH = 512, 4


def seed_prompt(prompt: str) -> str:
    return f"{SEED_USER}{prompt}{SEED_ASSISTANT}"


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(prompt, answer) of each conversation's first user->assistant pair."""
    pairs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = json.loads(line)["messages"]
        pairs.append((m[0]["content"], m[1]["content"]))
    return pairs


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def device_info(gpu: bool) -> dict:
    if gpu:
        return {"device": torch.cuda.get_device_name(0), "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"device": "cpu", "peak_gpu_mb": None}


def lora_config(model, spec: dict):
    from peft import LoraConfig, TaskType

    from chattune.models.loading import default_targets

    model_type = model.config.model_type
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=spec["lora_r"], lora_alpha=spec["lora_alpha"],
                      lora_dropout=spec["lora_dropout"], target_modules=default_targets(model_type), bias="none",
                      fan_in_fan_out=model_type == "gpt2")  # GPT-2's Conv1D stores weights (in, out)


def load_base(spec: dict):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def load_tokenizer(spec: dict):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    tok.pad_token = tok.eos_token  # as the seed did; TRL does the same when the tokenizer has none
    return tok


def timed(trainer_cls):
    """``trainer_cls`` that records each step's tokens and the clock at each step's end."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self, log):
            self.log = log

        def on_train_begin(self, args, state, control, **kw):
            self.log["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.log["step_end"].append(time.perf_counter())

    class Timed(trainer_cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.bench = {"tokens": [], "loss_tokens": [], "step_end": [], "t0": None}
            self.add_callback(Clock(self.bench))

        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]  # (B, T); padding-free: (1, sum of lengths)
            mask = inputs.get("attention_mask")
            self.bench["tokens"].append(int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel())
            self.bench["loss_tokens"].append(int((inputs["labels"][:, 1:] != -100).sum()))  # shifted, as the loss
            return super().training_step(model, inputs, num_items_in_batch)

    return Timed


def result_of(trainer, spec: dict, extra: dict) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**trainer.bench, "train_losses": losses, "threads": torch.get_num_threads(),
            "child_peak_rss_mb": peak_rss_mb(), **device_info(spec["gpu"]), **extra}


# -- (a) the seed notebook's recipe -------------------------------------------------------------
def run_seed(spec: dict) -> dict:
    """HF Trainer + DataCollatorForLanguageModeling(mlm=False), every text padded to 512, batch 4.

    The notebook trained in fp16 on an A100; CPUs have no fp16 autocast, so on CPU this is
    fp32 (the seed's precision on GPU runs with --gpu).
    """
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = load_tokenizer(spec)
    base = load_base(spec)
    model = get_peft_model(base, lora_config(base, spec))
    texts = [seed_prompt(p) + a for p, a in read_pairs(spec["train_file"])]
    data = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], padding="max_length", truncation=True, max_length=SEED_MAX_LENGTH),
        batched=True, remove_columns=["text"])
    args = TrainingArguments(
        output_dir=str(Path(spec["work"]) / "seed-run"), per_device_train_batch_size=SEED_BATCH,
        max_steps=spec["steps"], learning_rate=2e-5, weight_decay=0.01, fp16=spec["gpu"], use_cpu=not spec["gpu"],
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"])
    trainer = timed(Trainer)(model=model, args=args, train_dataset=data,
                             data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    model.save_pretrained(spec["adapters"]["seed"])
    return result_of(trainer, spec, {"precision": "fp16" if spec["gpu"] else "fp32"})


# -- (b) TRL --------------------------------------------------------------------------------------
def run_trl(spec: dict) -> dict:
    """TRL SFTTrainer + PEFT LoRA on a prompt-completion dataset (completion-only loss), BFD
    packing (padding-free, position_ids), settings from ``spec["trl"]``."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(spec)
    base = load_base(spec)
    pairs = read_pairs(spec["train_file"])
    data = Dataset.from_dict({"prompt": [seed_prompt(p) for p, _ in pairs], "completion": [a for _, a in pairs]})
    settings = dict(spec["trl"])
    if not spec["gpu"]:
        settings["use_cpu"] = True
        # like chattune's precision auto: bf16 only where the CPU multiplies it natively
        settings["bf16"] = settings.get("bf16", False) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    args = SFTConfig(output_dir=str(Path(spec["work"]) / "trl-run"), max_steps=spec["steps"],
                     max_length=spec["pack_length"], logging_steps=1, save_strategy="no", report_to="none",
                     disable_tqdm=True, seed=spec["seed"], **settings)
    trainer = timed(SFTTrainer)(model=base, args=args, train_dataset=data, processing_class=tok,
                                peft_config=lora_config(base, spec))
    trainer.train()
    trainer.model.save_pretrained(spec["adapters"]["trl"])
    precision = "bf16" if settings.get("bf16") else "fp16" if settings.get("fp16") else "fp32"
    return result_of(trainer, spec, {"precision": precision})


# -- the shared evaluation ------------------------------------------------------------------------
def answer_sample(tok, prompt: str, answer: str) -> tuple[list[int], int]:
    """Ids of prompt + answer + EOS, and where the answer starts. Written here, independent of
    all three systems, so every adapter is scored by the same code."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id] else []
    p = bos + tok(seed_prompt(prompt), add_special_tokens=False)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + a, len(p)


@torch.no_grad()
def answer_loss(model, samples: list[tuple[list[int], int]], device) -> float:
    """Mean cross-entropy over answer tokens and their closing EOS, fp32, one conversation at a time."""
    model.to(device).eval()
    total, count = 0.0, 0
    for ids, start in samples:
        x = torch.tensor([ids], device=device)  # (1, T)
        logits = model(input_ids=x, use_cache=False).logits[0, start - 1:-1].float()  # (answer tokens, V)
        total += float(torch.nn.functional.cross_entropy(logits, x[0, start:], reduction="sum"))
        count += len(ids) - start
    return total / count


def run_evaluate(spec: dict) -> dict:
    from peft import PeftModel

    device = torch.device("cuda" if spec["gpu"] else "cpu")
    tok = load_tokenizer(spec)
    samples = [answer_sample(tok, p, a) for p, a in read_pairs(spec["val_file"])]
    out = {"val_loss": {"base": answer_loss(load_base(spec), samples, device)},
           "val_answer_tokens": sum(len(ids) - start for ids, start in samples)}
    for system, adapter in spec["adapters"].items():
        model = PeftModel.from_pretrained(load_base(spec), adapter)
        out["val_loss"][system] = answer_loss(model, samples, device)
    if spec["gen_tokens"]:
        out["generation"] = run_generation(spec, tok, device)
    return out


# -- generation speed -----------------------------------------------------------------------------
class EmbedCounter:
    """Counts the positions embedded per forward call: after the prefill, a decoder that keeps
    its KV cache embeds exactly one new token per step."""

    def __init__(self, model):
        self.calls: list[int] = []
        self.handle = model.get_input_embeddings().register_forward_hook(
            lambda mod, args, out: self.calls.append(args[0].shape[-1]))

    def cached(self) -> bool:
        self.handle.remove()
        return len(self.calls) > 1 and all(n == 1 for n in self.calls[1:])


def _timed_decode(decode, model, n: int) -> tuple[float, bool]:
    decode(model, 4)  # warm-up: first-call allocations
    counter = EmbedCounter(model)
    start = time.perf_counter()
    decode(model, n)
    seconds = time.perf_counter() - start
    return n / seconds, counter.cached()


def run_generation(spec: dict, tok, device) -> dict:
    """Greedy tokens/s: chattune's decoding loop for every registered method (default settings)
    vs plain ``model.generate`` on the base model; same prompt, same number of new tokens, fp32
    (what ``chattune chat`` uses)."""
    from chattune.engine import GREEDY, Engine, Request, Variant
    from chattune.methods import all_methods

    prompt = tok(seed_prompt(spec["gen_prompt"]), add_special_tokens=False)["input_ids"]
    n = spec["gen_tokens"]

    def plain(model, k):
        x = torch.tensor([prompt], device=device)
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                       do_sample=False, use_cache=True, pad_token_id=tok.eos_token_id)

    def loop(model, k):  # eos_id=-1: never stops early, so every method decodes exactly k tokens
        Engine({"tuned": Variant(model)}, tok, eos_id=-1, max_batch=1).run(
            [Request(prompt, max_new_tokens=k, sampling=GREEDY)])

    speed, cached = _timed_decode(plain, load_base(spec).to(device).eval(), n)
    out = {"prompt_tokens": len(prompt), "new_tokens": n,
           "plain_generate": {"tokens_per_s": speed, "kv_cache": cached}, "chattune": {}}
    for name, method in all_methods().items():
        model = method.apply(load_base(spec), method.config_cls(), tok).to(device)
        speed, cached = _timed_decode(loop, model, n)
        out["chattune"][name] = {"tokens_per_s": speed, "kv_cache": cached}
    return out


RUNNERS = {"seed": run_seed, "trl": run_trl, "evaluate": run_evaluate}


def main() -> None:
    kind, spec_path, out_path = sys.argv[1:4]
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(spec["seed"])
    result = RUNNERS[kind](spec)
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
