"""Sharded training (``train.shard=fsdp``): PyTorch FSDP2 ``fully_shard`` over the processes
that ``accelerate launch`` starts, on CPU (gloo) and GPU (NCCL) alike.

Each process then holds 1/N of every parameter, gradient and AdamW state (DTensors sharded on
dim 0); a block's full weights exist only while it runs. The model is sharded the way
accelerate's own FSDP2 preparation does it (``accelerate/utils/fsdp_utils.py``,
``fsdp2_prepare_model``): each transformer block named in the model's ``_no_split_modules``,
then the root. Why call ``fully_shard`` here rather than through accelerate's plugin: accelerate
turns the plugin on only for GPU process groups (``accelerate/state.py``: CPU processes under
``--multi_gpu`` become ``MULTI_CPU`` and every FSDP setting is ignored), so a CPU test would
not run the code users run. Where the plugin is active (an accelerate config with
``distributed_type: FSDP`` on GPUs) this module takes its ``reshard_after_forward`` and
``cpu_offload`` settings, so there is one sharding path, not two.

Mixed precision stays chattune's autocast (``train.precision``): parameters are gathered in
their stored dtype and the matmuls run in bf16, the same arithmetic as an unsharded run.

Checkpoints keep the one format of unsharded runs: every process takes part in gathering the
trainable weights and the AdamW state to full tensors (collectives, in the same order
everywhere, one tensor at a time), only the main process keeps them in host memory and writes; on resume every process reads the full tensors and keeps its own
shard (``local_like``). A saved run is therefore read by eval/chat/serve/export as any run.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor, distribute_tensor

from chattune.errors import UserError

# Prompt and prefix tuning save their encoders through PEFT's get_prompt_embedding_to_save,
# which reads the (sharded) parameters directly; their few thousand trainable parameters
# gain nothing from sharding anyway.
UNSHARDABLE = ("prompt", "prefix")


def enabled(shard: str, acc: Accelerator) -> bool:
    """``train.shard=fsdp``, or an accelerate config whose FSDP plugin is active (GPUs)."""
    return shard == "fsdp" or acc.distributed_type == DistributedType.FSDP


def check(method: str, acc: Accelerator) -> None:
    """Refuse what sharding cannot do, in one line each."""
    if method in UNSHARDABLE:
        raise UserError(f"train.shard=fsdp does not support method '{method}' (its virtual-token encoder is saved "
                        f"from the unsharded parameters); use train.shard=none")
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise UserError("train.shard=fsdp and an accelerate DeepSpeed config both shard the model: pick one")
    if acc.num_processes < 2:
        raise UserError("train.shard=fsdp shards over processes: launch with `accelerate launch --num_processes N "
                        "-m chattune.cli train ...` (N >= 2; docs/scaling.md), or use train.shard=none")


def block_classes(model: torch.nn.Module) -> set[str]:
    """The transformer block classes (HF's ``_no_split_modules``, the default of accelerate's
    ``transformer_cls_names_to_wrap``)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def plugin_of(acc: Accelerator):
    """accelerate's FSDP plugin when it is active (an FSDP config on GPUs), else None."""
    return getattr(acc.state, "fsdp_plugin", None) if acc.distributed_type == DistributedType.FSDP else None


def options(plugin) -> dict:
    """``fully_shard`` keyword arguments from accelerate's FSDP plugin (None: the defaults,
    reshard after forward and no offload, as ``configs/accelerate/fsdp.yaml``)."""
    if plugin is None:
        return {}
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    kw = {}
    if isinstance(plugin.reshard_after_forward, bool):  # FSDP1-style sharding strategies have no FSDP2 meaning
        kw["reshard_after_forward"] = plugin.reshard_after_forward
    offload = plugin.cpu_offload
    if isinstance(offload, OffloadPolicy):
        kw["offload_policy"] = offload
    elif getattr(offload, "offload_params", False) or offload is True:
        kw["offload_policy"] = CPUOffloadPolicy()
    return kw


def shard_model(model: torch.nn.Module, acc: Accelerator) -> torch.nn.Module:
    """Shard ``model`` in place over all processes: each block, then the root. Call before the
    optimiser is built (it must hold the sharded parameters). ``requires_grad`` is kept, so the
    method's trainable parameters stay the only trainable ones."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = block_classes(model)
    if not blocks:
        raise UserError(f"train.shard=fsdp: {type(model).__name__} names no transformer blocks "
                        f"(_no_split_modules); use train.shard=none")
    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    kw = options(plugin_of(acc))
    for m in list(model.modules()):
        if type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_numel(model: torch.nn.Module) -> int:
    """Parameter elements this process holds (its shards, or everything when unsharded)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process must call it, in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _host(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The whole of ``t`` in host memory where ``keep`` (the writing process); elsewhere the
    gather only takes part in the collective and the tensor is dropped (None)."""
    t = full(t)
    return t.detach().cpu().contiguous() if keep else None


def saved_state(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor | None]:
    """The model's state dict as a method saves it, on CPU: trainable parameters gathered,
    frozen sharded ones left out (no method saves them), buffers as they are. Collective."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: _host(t, keep) for n, t in model.state_dict().items() if n in trainable or not isinstance(t, DTensor)}


def trainable_weights(model: torch.nn.Module, state: dict | None = None, keep: bool = True) -> dict:
    """Full trainable parameters by name on CPU (the checkpoint's weights). Collective when sharded."""
    if state is None:
        return {n: _host(p, keep) for n, p in model.named_parameters() if p.requires_grad}
    return {n: state[n] for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered. Collective."""
    sd = optimizer.state_dict()
    for idx in sorted(sd["state"]):  # the same order on every process
        sd["state"][idx] = {k: _host(v, keep) if isinstance(v, DTensor) else v for k, v in sd["state"][idx].items()}
    return sd


def local_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of the full ``value``, placed as ``like`` is; ``value`` itself
    when ``like`` is not sharded. No communication: every process holds ``value``."""
    if not isinstance(like, DTensor):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
