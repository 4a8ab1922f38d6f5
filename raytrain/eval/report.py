"""eval.md: the human-readable evaluation report, with PNG charts (matplotlib, Agg) in an `eval/` directory.

eval.json is the machine-readable twin (the promotion gate reads it); this file renders the same results for a
person: a summary of the figures the gate reads, then one section per suite with its table and its chart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["CHART_DIR", "chart", "write_markdown"]

CHART_DIR = "eval"  # charts live in <model dir>/eval/, linked relatively from eval.md

# Keys of each suite's result that a person reads first (the gate's keys among them).
HEADLINES = {
    "perplexity": ("perplexity", "parent_perplexity", "change_vs_parent", "untrained_perplexity", "beats_untrained"),
    "lm_eval": (),
    "win_rate": ("win_rate", "wins", "ties", "n", "candidate_reward_mean", "baseline_reward_mean"),
    "alignment": ("reward_gain",),
    "overfitting": ("flagged",),
    "safety": ("unsafe_rate", "unsafe", "generations", "classifier_flagged", "blocklist_flagged"),
}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")[:120]


def _scalars(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of the scalars in `d`, nested dicts flattened; lists left out (charts show them)."""
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += _scalars(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            rows.append((f"{prefix}{k}", v))
    return rows


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("figure", "value")) -> list[str]:
    return [f"| {head[0]} | {head[1]} |", "|---|---|", *(f"| `{k}` | {_fmt(v)} |" for k, v in rows)]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _bars(path: Path, title: str, labels: list[str], values: list[float], ylabel: str, log: bool = False) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bars = ax.bar(labels, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"][: len(values)])
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
    if log and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _overfitting_chart(path: Path, result: dict[str, Any]) -> bool:
    runs = {k: v for k, v in result.get("runs", {}).items() if v.get("points")}
    if not runs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), squeeze=False)
    for ax, (stage, run) in zip(axes[0], runs.items(), strict=True):
        steps = [p["step"] for p in run["points"]]
        ax.plot(steps, [p["train_loss"] for p in run["points"]], "o-", label="train")
        ax.plot(steps, [p["val_loss"] for p in run["points"]], "s-", label="held-out")
        ax.set_title(f"{stage}{' (flagged)' if run.get('flagged') else ''}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def chart(name: str, result: dict[str, Any], out_dir: Path) -> str | None:
    """Draw suite `name`'s chart into `out_dir`; the file name, or None when the result has nothing to draw."""
    path = out_dir / f"{name}.png"
    if name == "perplexity":
        pairs = [(k, result.get(key)) for k, key in (("candidate", "perplexity"), ("parent", "parent_perplexity"),
                                                     ("untrained", "untrained_perplexity"))]
        pairs = [(k, float(v)) for k, v in pairs if isinstance(v, (int, float))]
        _bars(path, f"perplexity on {result.get('split', 'held-out')}", [k for k, _ in pairs],
              [v for _, v in pairs], "perplexity (log scale)", log=True)
    elif name == "lm_eval":
        pairs = [(f"{task}\n{m}", v) for task, metrics in result.items() if isinstance(metrics, dict)
                 for m, v in metrics.items() if not m.endswith("stderr") and m != "n" and "stderr" not in m]
        if not pairs:
            return None
        _bars(path, "lm-eval tasks", [k for k, _ in pairs], [v for _, v in pairs], "score")
    elif name == "win_rate":
        n = max(int(result.get("n", 0)), 1)
        losses = n - result["wins"] - result["ties"]
        _bars(path, f"candidate vs {Path(str(result.get('baseline', 'baseline'))).name} (win rate "
              f"{result['win_rate']:.2f})", ["wins", "ties", "losses"],
              [result["wins"] / n, result["ties"] / n, losses / n], "share of response pairs")
    elif name == "alignment":
        models = [k for k in ("reference_model", "sft", "dpo", "rl", "candidate") if isinstance(result.get(k), dict)]
        _bars(path, "ground-truth reward (held-out prompts)", models,
              [result[k]["reward_mean"] for k in models], "mean reward (hidden rule)")
    elif name == "overfitting":
        if not _overfitting_chart(path, result):
            return None
    elif name == "safety":
        n = max(int(result.get("generations", 0)), 1)
        _bars(path, "generation safety", ["unsafe", "classifier", "blocklist"],
              [result.get("unsafe_rate", 0.0), result.get("classifier_flagged", 0) / n,
               result.get("blocklist_flagged", 0) / n], "share of generations")
    else:
        return None
    return path.name


def write_markdown(path: Path, doc: dict[str, Any], charts: dict[str, str]) -> None:
    """eval.md from the evaluation document (what eval.json gets) and the chart file name of each suite."""
    lines = ["# Evaluation", "", f"- model: `{doc.get('model_dir')}`", f"- parent: `{doc.get('parent')}`",
             f"- evaluated: {doc.get('evaluated')}", ""]
    headline = [(f"{name}.{k}", doc[name][k]) for name, keys in HEADLINES.items() if isinstance(doc.get(name), dict)
                for k in keys if k in doc[name]]
    headline += [(f"lm_eval.{task}.{m}", v) for task, ms in (doc.get("lm_eval") or {}).items()
                 if isinstance(ms, dict) for m, v in ms.items() if "stderr" not in m and m != "n"]
    lines += ["## Summary", "", *_table(headline), ""]
    lines += ["| suite | status | seconds |", "|---|---|---|"]
    for name, info in doc.get("suites", {}).items():
        status = f"skipped: {info['skipped']}" if "skipped" in info else "ran"
        lines.append(f"| {name} | {_fmt(status)} | {_fmt(info.get('seconds', ''))} |")
    lines.append("")
    for name, info in doc.get("suites", {}).items():
        lines += [f"## {name}", ""]
        if "skipped" in info:
            lines += [f"Skipped: {info['skipped']}", ""]
            continue
        result = doc.get(name, {})
        if name == "overfitting":
            for stage, run in result.get("runs", {}).items():
                lines += [f"### {stage}", "", run.get("reason", ""), "",
                          "| step | train loss | held-out loss | gap |", "|---|---|---|---|",
                          *(f"| {p['step']} | {p['train_loss']:.4f} | {p['val_loss']:.4f} | {p['gap']:+.4f} |"
                            for p in run.get("points", [])), ""]
        else:
            lines += [*_table(_scalars(result)), ""]
        if name in charts:
            lines += [f"![{name}]({CHART_DIR}/{charts[name]})", ""]
    path.write_text("\n".join(lines) + "\n")
