"""The model a run starts from: the base model, or (``--init-from RUN``) an earlier run's
trained weights merged into it, as in the usual SFT-then-DPO pipeline.

The earlier run is rebuilt with its own method and merged into plain weights, and the new
run's method is applied on top; its reference log-probs are then the earlier run's
(``chattune.training.reference``). Loading a run that was itself started with ``--init-from``
follows the chain. Methods that cannot merge (prompt, prefix, bottleneck adapters) cannot
be started from: their trained parts are not weights of the model.
"""

from __future__ import annotations

from pathlib import Path

from chattune.errors import UserError
from chattune.models.loading import load_model


def load_start_model(model_args, attn_implementation: str | None = None):
    """``model_args.name`` loaded as a plain transformers model, with ``model_args.init_from``'s
    trained weights merged in when set."""
    attn = attn_implementation or model_args.attn_implementation
    if not model_args.init_from:
        return load_model(model_args.name, trust_remote_code=model_args.trust_remote_code, attn_implementation=attn)
    from chattune.methods import get_method
    from chattune.training import rundir

    run_dir = Path(model_args.init_from)
    earlier = rundir.read_config(run_dir)
    if not rundir.adapter_dir(run_dir).is_dir():
        raise UserError(f"--init-from {run_dir}: the run has no trained weights yet (no adapter/); let it finish first")
    if earlier.model.name != model_args.name:
        raise UserError(f"--init-from {run_dir} was trained on {earlier.model.name}, not {model_args.name}; "
                        f"pass --model {earlier.model.name}")
    method = get_method(earlier.method.name)
    if method.merge is None:
        raise UserError(f"--init-from needs a run whose method merges into the weights (lora, dora, ia3, full); "
                        f"{run_dir} used {method.name}")
    base = load_start_model(earlier.model, attn)
    model = method.merge(method.load(base, rundir.adapter_dir(run_dir)))
    if model.config._attn_implementation != attn:  # full fine-tuning reloads a whole model directory
        model.set_attn_implementation(attn)
    for p in model.parameters():
        p.requires_grad_(False)  # the new run's method decides what trains
    return model.eval()
