"""``chattune methods``: every registered method with its trainable parameters on a model."""

from __future__ import annotations

import copy

from chattune.methods import all_methods, count_parameters


def method_rows(model_name: str) -> list[dict]:
    from chattune.models.loading import load_model, load_tokenizer

    base = load_model(model_name)
    tokenizer = load_tokenizer(model_name)
    rows = []
    for name, method in all_methods().items():
        model = method.apply(copy.deepcopy(base), method.config_cls(), tokenizer)
        trainable, total = count_parameters(model)
        rows.append({"method": name, "trainable": trainable, "total": total, "share": trainable / total,
                     "packing": method.supports_packing, "mergeable": method.merge is not None,
                     "description": method.description})
        del model
    return rows


def list_methods(model_name: str) -> str:
    rows = method_rows(model_name)
    lines = [f"methods on {model_name} (defaults; settings under method.<name> in the config)",
             f"{'method':8s} {'trainable':>12s} {'share':>9s}  {'packing':7s} {'export':7s}  description"]
    for r in rows:
        lines.append(f"{r['method']:8s} {r['trainable']:>12,d} {100 * r['share']:>8.3f}%  "
                     f"{'yes' if r['packing'] else 'no':7s} {'merge' if r['mergeable'] else 'side':7s}  {r['description']}")
    return "\n".join(lines)
