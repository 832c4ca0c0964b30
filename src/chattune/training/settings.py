"""What a run is configured with: one dataclass per section of the YAML config.

```yaml
model: {name: smollm2-135m}
data: {dataset: sample, max_length: 1024}     # chattune.data.DataConfig
method: {name: lora, lora: {r: 8}}
train: {lr: 2.0e-4, max_steps: 100}
eval: {num_generate: 100}
```
The resolved config is written beside every run as ``config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from chattune.config import field, from_dict, load_yaml, merge, parse_overrides
from chattune.data import DataConfig
from chattune.errors import UserError


@dataclass
class ModelArgs:
    name: str = field("smollm2-135m", help="hub id, local HF directory, .gguf file, or the built-in smollm2-135m")
    trust_remote_code: bool = field(False, help="run modelling code shipped with a hub model (only if you trust it)")
    attn_implementation: str = field("sdpa", help="attention kernel: sdpa or eager")
    init_from: str | None = field(None, help="start from this finished run's trained weights (merged into the "
                                  "model; e.g. SFT then DPO); it is then the preference reference")


@dataclass
class MethodArgs:
    name: str = field("lora", help="lora | adapter | prompt | prefix | ia3 | dora | full (see `chattune methods`)")
    lora: dict = field({}, help="LoRA settings (r, alpha, dropout, target_modules)")
    dora: dict = field({}, help="DoRA settings (same keys as lora)")
    ia3: dict = field({}, help="IA3 settings (target_modules, feedforward_modules)")
    adapter: dict = field({}, help="bottleneck adapter settings (placement, reduction_factor, ...)")
    prompt: dict = field({}, help="prompt tuning settings (num_virtual_tokens, init_text)")
    prefix: dict = field({}, help="prefix tuning settings (num_virtual_tokens, prefix_projection)")
    full: dict = field({}, help="full fine-tuning (no settings)")

    def settings(self):
        """The selected method's typed settings, validated (unknown keys are errors)."""
        from chattune.methods import get_method

        method = get_method(self.name)
        return from_dict(method.config_cls, getattr(self, self.name), f"method.{self.name}")


@dataclass
class TrainArgs:
    output_dir: str = field("runs/run", help="run directory: config, adapter, tokenizer, metrics, checkpoint")
    max_steps: int | None = field(None, help="optimiser steps; overrides epochs when set")
    max_tokens: int | None = field(None, help="train until this many conversation tokens were seen (same budget "
                                   "for methods that pack and methods that cannot); overrides max_steps and epochs")
    epochs: float = field(1.0, help="passes over the training split")
    lr: float = field(2e-4, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    warmup_ratio: float = field(0.05, help="share of steps with linear warmup before the cosine decay")
    batch_size: int = field(8, help="micro-batch size per process (rows; a packed row holds several conversations)")
    grad_accum: int = field(1, help="micro-batches accumulated per optimiser step")
    max_grad_norm: float = field(1.0, help="gradient clipping norm (0 disables)")
    neftune_alpha: float = field(0.0, help="NEFTune (Jain et al. 2023): uniform noise of scale alpha/sqrt(L*d) on the "
                                           "input embeddings while training, L each conversation's length; 5 in the "
                                           "paper; 0: off")
    unlikelihood_alpha: float = field(0.0, help="SFT: weight of token-level unlikelihood (Welleck et al. 2020) "
                                      "pushing each answer away from its own earlier tokens, against loops; "
                                      "1 in the paper; 0: off")
    packing: bool | None = field(None, help="pack several conversations per row (default: on where the method supports it)")
    packed_layout: Literal["auto", "flat", "mask"] = field(
        "auto", help="how packed conversations reach attention. flat: one row without padding, attention run per "
                     "conversation (sdpa, flash-attention); mask: padded rows with a block-diagonal mask (any "
                     "kernel, eager included; measured slower, see benchmarks/levers.py); auto: flat unless eager")
    precision: Literal["auto", "bf16", "fp32"] = field("auto", help="auto: bfloat16 autocast where supported (CPU included), else fp32")
    seed: int = field(0, help="seed for data order, initialisation and dropout")
    loss_logits: Literal["selected", "full"] = field(
        "selected", help="selected: LM-head logits only where a token carries loss; full: at every position "
                         "(the HF default; kept to measure the difference, see benchmarks/levers.py)")
    shard: Literal["none", "fsdp"] = field(
        "none", help="none: every process holds the whole model (data parallel under `accelerate launch`); fsdp: "
                     "PyTorch FSDP2 shards weights, gradients and AdamW state over the processes (>= 2; LoRA, "
                     "DoRA, IA3, adapter, full; see docs/scaling.md)")
    compile: bool = field(False, help="torch.compile the model through Accelerate (inductor); off by default: "
                                      "measured slower on short CPU runs, see benchmarks/levers.py")
    log_every: int = field(10, help="optimiser steps between metrics.jsonl lines")
    eval_every: int = field(0, help="optimiser steps between validation passes (0: only at the end)")
    save_every: int = field(50, help="optimiser steps between checkpoints")
    early_stopping_patience: int = field(0, help="stop after this many evaluations without improvement (0: off)")
    tensorboard: bool = field(False, help="also log to TensorBoard under output_dir/tb")
    max_eval_samples: int = field(200, help="validation samples used by each in-training evaluation")
    objective: Literal["sft", "dpo", "ipo", "simpo", "orpo", "kto"] = field(
        "sft", help="sft: next-token loss on answers; dpo|ipo|simpo|orpo: preference pairs "
                    "(chattune.training.objectives); kto: desirable and undesirable single answers")
    beta: float | None = field(None, help="preference strength: DPO/IPO beta (default 0.1), SimPO beta (default 2.0); "
                               "scales the logged rewards of ORPO")
    label_smoothing: float = field(0.0, help="DPO/SimPO: assumed share of flipped votes, robust DPO "
                                   "(Chowdhury et al. 2024); in [0, 0.5)")
    simpo_gamma: float = field(1.0, help="SimPO target reward margin gamma")
    orpo_alpha: float = field(0.1, help="ORPO weight of the odds-ratio term (the paper's lambda)")
    sft_weight: float = field(0.0, help="preferences: weight of an added SFT term on the chosen answer")
    ties: Literal["drop", "rao-kupper", "davidson"] = field(
        "drop", help="dpo: what 'tie' votes do. drop: nothing (counted as dropped); rao-kupper|davidson: they "
                     "become tie pairs whose loss is -log P(tie) of that tie model (Chen et al. 2024)")
    tie_nu: float | None = field(None, help="dpo with ties: the tie model's nu; default 1.5 (rao-kupper, > 1) or "
                                 "0.5 (davidson, > 0): P(tie) = 0.2 at a zero margin, the share of ties among the "
                                 "arena's decided and tied votes")
    kto_desirable_weight: float = field(1.0, help="kto: weight lambda_D of desirable answers")
    kto_undesirable_weight: float = field(1.0, help="kto: weight lambda_U of undesirable answers (the paper keeps "
                                          "lambda_D n_D / (lambda_U n_U) in [1, 4/3]; a run outside it warns)")

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("train.max_steps must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError("train.max_tokens must be >= 1")
        if self.neftune_alpha < 0:
            raise UserError(f"train.neftune_alpha must be >= 0 (0: off), got {self.neftune_alpha}")
        if self.unlikelihood_alpha < 0:
            raise UserError(f"train.unlikelihood_alpha must be >= 0 (0: off), got {self.unlikelihood_alpha}")
        if self.unlikelihood_alpha and self.objective != "sft":
            raise UserError("train.unlikelihood_alpha applies to train.objective sft only")
        if self.lr <= 0 or self.epochs <= 0:
            raise UserError("train.lr and train.epochs must be positive")
        if self.beta is not None and self.beta <= 0:
            raise UserError("train.beta must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError("train.label_smoothing must be in [0, 0.5)")
        if self.label_smoothing and self.objective not in ("dpo", "simpo"):
            raise UserError(f"train.label_smoothing applies to dpo and simpo, not {self.objective}")
        if self.shard == "fsdp" and self.compile:
            raise UserError("train.compile is not supported with train.shard=fsdp; drop one")
        if self.orpo_alpha < 0 or self.sft_weight < 0:
            raise UserError("train.orpo_alpha and train.sft_weight must not be negative")
        self._check_ties_and_kto()

    def _check_ties_and_kto(self) -> None:
        if self.ties != "drop" and self.objective != "dpo":
            raise UserError(f"train.ties applies to train.objective dpo, not {self.objective}")
        if self.ties != "drop" and self.label_smoothing:
            raise UserError("train.ties and train.label_smoothing cannot be combined (the tie models have no "
                            "flipped-vote form)")
        if self.tie_nu is not None:
            if self.ties == "drop":
                raise UserError("train.tie_nu needs train.ties rao-kupper or davidson")
            low = 1.0 if self.ties == "rao-kupper" else 0.0  # at low a tie has probability 0
            if not self.tie_nu > low:
                raise UserError(f"train.tie_nu must be above {low:g} for {self.ties}, got {self.tie_nu}")
        if self.kto_desirable_weight <= 0 or self.kto_undesirable_weight <= 0:
            raise UserError("train.kto_desirable_weight and train.kto_undesirable_weight must be positive")


@dataclass
class EvalArgs:
    split: str = field("test", help="split to evaluate: train, validation or test")
    batch_size: int = field(8, help="batch size for loss evaluation")
    max_samples: int | None = field(None, help="evaluate at most this many samples of the split")
    num_generate: int = field(100, help="prompts answered for the generation metrics (all when fewer)")
    max_new_tokens: int = field(512, help="generation budget per answer")


@dataclass
class RunConfig:
    model: ModelArgs = field(ModelArgs(), help="base model")
    data: DataConfig = field(DataConfig(), help="data selection, rendering and tokenisation")
    method: MethodArgs = field(MethodArgs(), help="fine-tuning method and its settings")
    train: TrainArgs = field(TrainArgs(), help="optimisation and run bookkeeping")
    eval: EvalArgs = field(EvalArgs(), help="evaluation settings")


# Common flags → dotted config keys (everything else: --set section.key=value).
FLAG_KEYS = {
    "model": "model.name", "dataset": "data.dataset", "format": "data.format", "method": "method.name",
    "max_steps": "train.max_steps", "max_tokens": "train.max_tokens", "epochs": "train.epochs", "lr": "train.lr", "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum", "max_length": "data.max_length", "packing": "train.packing",
    "output_dir": "train.output_dir", "seed": "train.seed", "precision": "train.precision",
    "objective": "train.objective", "init_from": "model.init_from", "chosen_model": "data.chosen_model",
    "rejected_model": "data.rejected_model", "turns": "data.turns",
}


def build_config(config_path: str | dict | None, flags: dict, overrides: list[str],
                 sections: dict | None = None) -> RunConfig:
    """YAML file (or its mapping), then common flags, then whole sections (the Python API's
    ``train={...}``), then ``--set`` overrides; later wins."""
    data = (dict(config_path) if isinstance(config_path, dict) else load_yaml(config_path)) if config_path else {}
    from chattune.config import set_dotted

    flag_data: dict = {}
    for name, value in flags.items():
        if value is not None:
            set_dotted(flag_data, FLAG_KEYS[name], value)
    data = merge(merge(merge(data, flag_data), sections or {}), parse_overrides(overrides))
    cfg = from_dict(RunConfig, data, "config")
    cfg.method.settings()  # validate the selected method's section now, not mid-run
    return cfg
