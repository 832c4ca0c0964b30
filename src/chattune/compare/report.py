"""The report of ``chattune compare``: one row per method from its run directory, then
results.json, results.csv, results.md, PNG plots and one self-contained report.html.

Written by hand (no templating dependency): the HTML is a few tables and the plots
embedded as base64 data URIs, so the file can be mailed or attached as it is.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path

from chattune.config import load_yaml
from chattune.training import rundir

# (row key, header, format) in table order; None values print as "–".
COLUMNS = [
    ("method", "method", "{}"), ("lr", "lr", "{:g}"),
    ("trainable_params", "trainable params", "{:,}"), ("trainable_share", "share", "{:.3%}"),
    ("peak_memory_mb", "peak memory (MB)", "{:,.0f}"), ("wall_s", "wall time (s)", "{:,.0f}"),
    ("tokens_per_s", "train tokens/s", "{:,.0f}"), ("final_train_loss", "final train loss", "{:.3f}"),
    ("val_loss", "val loss", "{:.3f}"), ("val_ppl", "val ppl", "{:.2f}"),
    ("test_loss", "test loss", "{:.3f}"), ("test_ppl", "test ppl", "{:.2f}"),
    ("eos_share", "ends with EOS", "{:.0%}"), ("loop_share", "loops", "{:.0%}"), ("rep4", "seq-rep-4", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"), ("rouge_l", "ROUGE-L", "{:.3f}"),
    ("median_length", "median answer length", "{:.0f}"), ("error", "error", "{}"),
]
# results.csv: the table's columns plus the bookkeeping behind them.
CSV_KEYS = [k for k, _, _ in COLUMNS] + ["status", "total_params", "packing", "steps", "tokens", "train_seconds",
                                         "step_seconds", "eval_wall_s", "best_val_loss", "reused"]
GENERATION_KEYS = ["eos_share", "loop_share", "rep4", "distinct_2", "rouge_l", "median_length"]


# -- rows -----------------------------------------------------------------------------------
def eval_columns(sides: dict) -> dict:
    """Table columns from one model's validation loss/ppl and its side of eval_test.json
    (the answers of the headline decoding, the shipped sampling)."""
    from chattune.evaluate import HEADLINE

    val, test = sides.get("validation") or {}, sides.get("test") or {}
    row = {"val_loss": val.get("loss"), "val_ppl": val.get("ppl"), "test_loss": test.get("loss"),
           "test_ppl": test.get("ppl")}
    answers = test.get(HEADLINE) or {}
    row.update({k: answers.get(k) for k in GENERATION_KEYS})
    row["samples"] = answers.get("samples", [])
    return row


def val_curve(metrics_path: Path) -> list[dict]:
    """The run's validation passes as metrics.jsonl lines; a resumed run re-logs the steps
    after its checkpoint, and the last line of a step wins."""
    points = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            points[rec["step"]] = rec
    return [points[step] for step in sorted(points)]


def method_row(run_dir: Path, method: str, times: dict, test: dict) -> dict:
    """One finished method's row, from the files its run wrote (``test``: eval_test.json)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    info = rundir.read_info(run_dir)
    curve = val_curve(run_dir / "metrics.jsonl")
    row = {"method": method, "status": "done", "lr": load_yaml(run_dir / "config.yaml")["train"]["lr"],
           "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
           "trainable_share": info["trainable_share"], "packing": info["packing"], "steps": summary["steps"],
           "tokens": summary["tokens"], "peak_memory_mb": summary["peak_memory_mb"],
           "wall_s": times["train_wall_s"], "eval_wall_s": times["eval_wall_s"],
           "train_seconds": summary["train_seconds"], "step_seconds": summary["train_seconds"] / summary["steps"],
           "tokens_per_s": summary["tokens_per_s"], "final_train_loss": summary["final_train_loss"],
           "best_val_loss": summary["best_val_loss"], "error": None}
    last = {"loss": curve[-1]["val_loss"], "ppl": curve[-1]["val_ppl"]} if curve else None
    row.update(eval_columns({"validation": last, "test": test["tuned"]}))
    row["val_curve"] = [[p["step"], p["val_loss"]] for p in curve]
    return row


def base_row(base: dict | None) -> dict | None:
    """The base model's row (method switched off): evaluation columns only."""
    if base is None:
        return None
    return {"method": "base", "status": "done", "trainable_params": 0, "trainable_share": 0.0, "error": None,
            **eval_columns(base)}


# -- text tables ------------------------------------------------------------------------------
def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return fmt.format(value)


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a GitHub Markdown table (base first, when present)."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(row, k, f).replace("|", "\\|").replace("\n", " ") for k, _, f in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, record: dict, base: dict | None, rows: list[dict]) -> None:
    """results.json, results.csv, results.md, plots/*.png and report.html in ``out``."""
    table_rows = ([base] if base else []) + rows
    settings = {k: record[k] for k in ("methods", "budget", "device", "per_method")}
    settings.update(model=record["config"]["model"]["name"], dataset=record["config"]["data"]["dataset"],
                    seed=record["config"]["train"]["seed"])
    (out / "results.json").write_text(json.dumps({"settings": settings, "base": base, "methods": rows}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_KEYS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table_rows)
    (out / "results.md").write_text(markdown_table(table_rows) + "\n")
    pngs = plots(rows, base)
    (out / "plots").mkdir(exist_ok=True)
    for name, data in pngs.items():
        (out / "plots" / f"{name}.png").write_bytes(data)
    (out / "report.html").write_text(render_html(settings, record, table_rows, pngs), encoding="utf-8")


# -- plots ----------------------------------------------------------------------------------
def plots(rows: list[dict], base: dict | None) -> dict[str, bytes]:
    """PNG bytes by name: validation loss curves, loss against parameters, speed and memory."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return {}
    base_val = base.get("val_loss") if base else None
    out = {}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in done:
        if r["val_curve"]:
            steps, losses = zip(*r["val_curve"])
            ax.plot(steps, losses, marker="o", label=r["method"])
    _base_line(ax, base_val)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps, not fractions of one
    ax.set(xlabel="optimiser step", ylabel="validation answer-token loss", title="Validation loss")
    out["val_loss"] = _png(fig, ax)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in (r for r in done if r["val_loss"] is not None and r["trainable_params"] > 0):
        ax.scatter(r["trainable_params"], r["val_loss"], s=40)
        ax.annotate(r["method"], (r["trainable_params"], r["val_loss"]), textcoords="offset points", xytext=(5, 4))
    _base_line(ax, base_val)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters (log scale)", ylabel="final validation loss", title="Loss against size")
    out["loss_vs_params"] = _png(fig, ax)

    fig, (left, right) = plt.subplots(1, 2, figsize=(6.4, 4))
    names = [r["method"] for r in done]
    left.bar(names, [r["tokens_per_s"] for r in done], color="tab:blue")
    left.set(ylabel="training tokens/s", title="Throughput")
    right.bar(names, [r["peak_memory_mb"] for r in done], color="tab:orange")
    right.set(ylabel="MB", title="Peak memory")
    out["speed_memory"] = _png(fig, None)
    return out


def _base_line(ax, value: float | None) -> None:
    if value is not None:
        ax.axhline(value, color="gray", linestyle="--", label="base")


def _png(fig, legend_ax) -> bytes:
    import matplotlib.pyplot as plt

    if legend_ax is not None and legend_ax.get_legend_handles_labels()[0]:
        legend_ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# -- HTML -----------------------------------------------------------------------------------
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 6px;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right}tr.failed td{background:#fff0f0}
.gen td{white-space:pre-wrap;max-width:420px}.note{color:#666;font-size:12px}img{max-width:49%;margin:.5em 0;vertical-align:top}"""


def render_html(settings: dict, record: dict, rows: list[dict], pngs: dict[str, bytes]) -> str:
    """One self-contained page: settings, the table, the plots, generations side by side."""
    e = html.escape
    budget = record["budget"]
    steps = ", ".join(f"{k}: {v}" for k, v in budget["steps"].items())
    memory = "max allocated on the GPU" if settings["device"] == "cuda" else "peak RSS of the training process"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>chattune compare</title>"
             f"<style>{STYLE}</style></head><body><h1>chattune compare</h1>",
             f"<p>model <b>{e(str(settings['model']))}</b>, dataset <b>{e(str(settings['dataset']))}</b>, seed "
             f"{settings['seed']}, device {e(settings['device'])}. Every method trains on "
             f"<b>{budget['max_tokens']:,}</b> conversation tokens (optimiser steps with packing / without: "
             f"{e(steps)}).</p>",
             f"<p class='note'>Losses are answer-token cross-entropy; the validation loss is each run's last "
             f"validation pass (the base model's on the same samples); peak memory is the {memory}; wall time "
             f"covers training (model load, steps, validation passes); generation metrics come from greedy "
             f"answers to the same test prompts.</p>",
             "<h2>Results</h2>", _html_table(rows), "<h2>Plots</h2>"]
    for name, data in pngs.items():
        parts.append(f'<img alt="{e(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">')
    parts += ["<h2>Sample generations</h2>", _html_generations(rows), "</body></html>"]
    return "\n".join(parts)


def _html_table(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS)
    body = []
    for row in rows:
        cells = "".join(f"<td{'' if k in ('method', 'error') else ' class=num'}>{html.escape(_cell(row, k, f))}</td>"
                        for k, _, f in COLUMNS)
        body.append(f"<tr{' class=failed' if row['status'] != 'done' else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _html_generations(rows: list[dict]) -> str:
    # Every run answered the same prompts (same data config, seeded sampling); align by prompt text.
    columns = [r for r in rows if r.get("samples")]
    if not columns:
        return "<p>No generations (no method finished).</p>"
    prompts = [s["prompt"] for s in columns[0]["samples"]]
    answers = [{s["prompt"]: s for s in r["samples"]} for r in columns]
    head = "<th>prompt</th>" + "".join(f"<th>{html.escape(r['method'])}</th>" for r in columns)
    body = []
    for prompt in prompts:
        cells = [f"<td>{html.escape(prompt)}</td>"]
        for by_prompt in answers:
            s = by_prompt.get(prompt)
            end = "" if s is None else (" ⏎ EOS" if s["stopped"] else " … (cut at the token limit)")
            cells.append(f"<td>{html.escape(s['answer']) if s else '–'}<span class='note'>{end}</span></td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class='gen'><tr>{head}</tr>{''.join(body)}</table>"
