"""One method's run inside a comparison: the shared config with that method's settings.

Read by the command (to check every method's settings before any run starts) and by the
worker (to train it), so it lives below both.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from chattune.config import from_dict


def method_config(record: dict, method: str, out: Path):
    """One method's RunConfig: the shared config, its per-method train settings, its run dir."""
    from chattune.methods import get_method
    from chattune.training.settings import RunConfig

    data = copy.deepcopy(record["config"])
    data["method"]["name"] = method
    train = data["train"]
    train.update(record["per_method"].get(method, {}))
    train["output_dir"] = str(out / method)
    if not record["eval_every_set"]:
        packs = train["packing"] if train["packing"] is not None else get_method(method).supports_packing
        steps = record["budget"]["steps"]["packed" if packs else "unpacked"]
        train["eval_every"] = max(1, math.ceil(steps / record["eval_points"]))
    return from_dict(RunConfig, data, "config")
