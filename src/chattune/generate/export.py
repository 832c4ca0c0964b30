"""``chattune export RUN_DIR OUT``: a standalone Hugging Face model directory.

LoRA, DoRA and IA3 merge into the weights and full fine-tuning is saved as is: OUT loads
with plain ``AutoModelForCausalLM.from_pretrained(OUT)``. Prompt tuning, prefix tuning and
bottleneck adapters change the computation, not just the weights, so they cannot become
a plain model: OUT then holds the base model and the method's files side by side, plus
the two lines that load them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from chattune.errors import UserError
from chattune.generate.loaded import load_run

RECIPES = {
    "adapter": ("from chattune.methods.adapter import load\n"
                "model = load(AutoModelForCausalLM.from_pretrained('{out}/base'), '{out}/adapter')"),
    "default": ("from peft import PeftModel\n"
                "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{out}/base'), '{out}/adapter')"),
}


def export(run_dir: str, out: str) -> str:
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; choose a new directory")
    run = load_run(run_dir)
    if run.method.merge is not None:
        model = run.method.merge(run.model)
        model.config.use_cache = True
        model.save_pretrained(out_dir, safe_serialization=True)
        run.tokenizer.save_pretrained(out_dir)
        return f"wrote {out_dir}: {run.method.name} merged into the weights; load with AutoModelForCausalLM.from_pretrained('{out_dir}')"
    _save_base(run, out_dir / "base")
    shutil.copytree(Path(run_dir) / "adapter", out_dir / "adapter")
    run.tokenizer.save_pretrained(out_dir / "base")
    recipe = "from transformers import AutoModelForCausalLM\n" + RECIPES.get(run.method.name, RECIPES["default"]).format(out=out_dir)
    (out_dir / "LOAD.md").write_text(f"# {run.method.name} cannot be merged into plain weights\n\n```python\n{recipe}\n```\n")
    return (f"{run.method.name} cannot become plain weights; wrote base model and {run.method.name} files to {out_dir}. "
            f"Load with:\n{recipe}")


def _save_base(run, path: Path) -> None:
    from chattune.training.init_from import load_start_model

    base = load_start_model(run.cfg.model)  # with --init-from: the earlier run merged in, what the method sits on
    base.config.use_cache = True
    base.save_pretrained(path, safe_serialization=True)
