"""The sections of the run report (summary, training, recall, examination, funnel, notes) as HTML.

:mod:`twotower.report` reads the run and assembles the page; this module turns what it read into each
section's HTML: escaped tables, the PNG charts (matplotlib on an explicit Agg canvas, fixed margins,
written atomically) and, where data is missing, a line saying what is missing and how to get it. Kept
apart because drawing and formatting change for other reasons than which files a run holds, and a
section can be checked from a hand-made ``run`` dict without a trained run.

``run`` is what :mod:`twotower.report` read: ``{key: parsed file or None}`` for config, metrics, history,
model, demo and ranker, plus ``problems`` ``{key: why a file was not used}``.
"""

from __future__ import annotations

import html
import io
import math
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from twotower.storage import atomic_write_bytes

__all__ = [
    "Charts",
    "examination_section",
    "fmt_value",
    "funnel_section",
    "is_number",
    "metric_comparison",
    "metric_order",
    "notes_section",
    "recall_section",
    "summary_section",
    "training_section",
]

_QUALITY = re.compile(r"^(?:[a-z]+@(\d+)|top(\d+)_accuracy)$")  # test metrics, as evaluate.py names them
_RECALL = re.compile(r"^(?:recall@(\d+)|top(\d+)_accuracy)$")  # top-K accuracy is recall of one target

# What a section says when its data is missing, and how to get it (trusted HTML).
_HOW = {
    "config": "No config.yaml: <code>twotower train</code> writes one into every run.",
    "metrics": "No metrics.json: the run has not finished (or run <code>twotower evaluate RUN_DIR</code>).",
    "history": "No history.json: training writes it when it ends (<code>--resume</code> finishes a run).",
    "valid": "No validation metrics: the protocol has no validation split of its own; set "
    "<code>train.valid_fraction</code> (e.g. 0.1) to hold out training rows.",
    "recall": "Recall at fewer than two cut-offs: train with <code>--set eval.ks=[1,5,10,20,50,100]</code>, "
    "or pass <code>extra={'recall_curves': {label: {K: value}}}</code>.",
    "ranker": "No ranker/: <code>twotower train-ranker RUN_DIR impressions.csv</code> trains a debiased one.",
    "bias": "The ranker has no bias tower, so it learned no examination curve.",
    "funnel": "No funnel metrics: pass <code>extra={'funnel': {stage: {metric: value}}}</code> "
    "(<code>twotower.funnel_metrics</code> computes them).",
    "notes": "No notes (<code>extra={'notes': [...]}</code>).",
}


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def is_number(value: Any) -> bool:
    """An int or float from a file (a JSON true/false is a bool, not a number to plot)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def metric_order(key: str) -> tuple[str, int]:
    """Sort key of a metric name by metric, then cut-off as a number: JSON files keep keys in text
    order, which would put recall@10 before recall@5."""
    match = _QUALITY.match(key)
    if match is None:
        return key, 0
    cut = int(match.group(1) or match.group(2))
    return (key.split("@")[0] if match.group(1) else "top_accuracy"), cut


def metric_comparison(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Test metrics per method: this run, then the demo's baselines computed on the same split."""
    own = {k: v for k, v in (run["metrics"] or {}).items() if _QUALITY.match(k) and is_number(v)}
    methods = {"this run": own} if own else {}
    for method, values in (_get(run["demo"], "metrics") or {}).items():
        # The demo lists the run itself too (same numbers): shown once, as "this run".
        if isinstance(values, dict) and not (own and all(own.get(k) == v for k, v in values.items())):
            methods[str(method)] = {k: v for k, v in values.items() if is_number(v)}
    return {
        m: dict(sorted(values.items(), key=lambda kv: metric_order(kv[0]))) for m, values in methods.items()
    }


# ------------------------------------------------------------------------------------- formatting
def fmt_value(value: Any) -> str:
    """A table cell's text (HTML tables and the plain-text summary format numbers alike)."""
    if isinstance(value, float) and math.isnan(value):  # a metric no query could define
        return "n/a"
    if isinstance(value, float):  # large ones (examples/s) keep one decimal, the rest (metrics) four
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4f}"
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(tag: str, value: Any) -> str:
        numeric = ' class="n"' if tag == "td" and is_number(value) else ""
        return f"<{tag}{numeric}>{html.escape(fmt_value(value))}</{tag}>"

    head = "".join(cell("th", h) for h in header)
    body = "".join("<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _missing(key: str, run: dict[str, Any] | None = None) -> str:
    """Why a section is empty: the file's problem (escaped: it quotes file data) or what to do (_HOW)."""
    if run is not None and key in run["problems"]:
        return f'<p class="missing">{html.escape(run["problems"][key])}</p>'
    return f'<p class="missing">{_HOW[key]}</p>'


def _plain(text: str) -> str:
    """Chart text as given: a "$" would start matplotlib mathtext, a leading "_" hides a legend entry."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _figure(width: float, height: float) -> Figure:
    """Fixed margins, in inches: a layout engine would double the time to draw (a second on 2 cores)."""
    fig = Figure(figsize=(width, height))
    left, bottom, right, top = 0.75 / width, 0.55 / height, 0.15 / width, 0.35 / height
    fig.subplots_adjust(left, bottom, 1 - right, 1 - top, wspace=0.3, hspace=0.5)
    return fig


class Charts:
    """The report's PNG folder, and which charts this build wrote (any other one there is stale)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: set[str] = set()

    def save(self, fig: Figure, name: str, alt: str) -> str:
        """Write the chart atomically; return its <img> tag (a path relative to the HTML file)."""
        for ax in fig.axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        buffer = io.BytesIO()
        FigureCanvasAgg(fig)  # an explicit Agg canvas: no display, and no global pyplot state to disturb
        fig.savefig(buffer, format="png", dpi=110)
        atomic_write_bytes(self.folder / name, buffer.getvalue())
        self.written.add(name)
        return f'<img src="{html.escape(quote(self.folder.name))}/{name}" alt="{html.escape(alt)}">'


# -------------------------------------------------------------------------------------- sections
# Config highlights: row label -> config paths ("name=path" or a path named by its last key); None skipped.
_HIGHLIGHTS = {
    "data": ("data.source", "data.name", "data.path", "data.interactions", "data.world.num_users",
             "data.world.num_items", "data.world.seed"),
    "model": ("model.similarity", "model.temperature"),
    "user tower": ("model.user_tower.embedding_dim", "model.user_tower.layers", "model.user_tower.dropout"),
    "item tower": ("model.item_tower.embedding_dim", "model.item_tower.layers", "model.item_tower.dropout"),
    "history": ("model.history.enabled", "model.history.pooling", "model.history.max_len"),
    "task": ("task.objective", "task.logq", "task.negatives.in_batch", "task.negatives.sampler",
             "task.negatives.num_sampled", "hard=task.negatives.hard.num", "task.negatives.impressions"),
    "training": ("train.epochs", "train.batch_size", "train.optimizer", "train.lr",
                 "early_stopping=train.early_stopping.metric", "train.valid_fraction"),
    "evaluation": ("eval.protocol", "eval.ks"),
}  # fmt: skip


def _highlights(cfg: dict[str, Any], model: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, text) rows, HTML-escaped (feature names and paths come from the file)."""
    rows = []
    for label, paths in _HIGHLIGHTS.items():
        pairs = [p.rpartition("=")[::2] for p in paths]  # "name=path", or a bare path named by its last key
        values = [(name or path.rsplit(".")[-1], _get(cfg, *path.split("."))) for name, path in pairs]
        rows.append((label, ", ".join(f"{key} {value}" for key, value in values if value is not None)))
    for side, specs in (cfg.get("features") or {}).items():
        named = [f"{f.get('name')} ({f.get('type')})" for f in specs or [] if isinstance(f, dict)]
        rows.append((f"{side} features", ", ".join(named)))
    if model:
        size = f"{len(model.get('user_ids') or [])} users, {len(model.get('item_ids') or [])} items"
        rows.append(("catalogue", f"{size}, embedding_dim {model.get('embedding_dim')}"))
    return [(html.escape(label), html.escape(text)) for label, text in rows]


def summary_section(run: dict[str, Any]) -> str:
    """Config highlights, then the test metrics beside any demo baselines and the run's other facts."""
    parts = [_missing("demo", run) if "demo" in run["problems"] else ""]
    if run["config"] is None:
        parts.append(_missing("config", run))
    else:
        rows = _highlights(run["config"], run["model"])
        parts.append("<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>")
    metrics = run["metrics"]
    if metrics is None:
        return "".join([*parts, _missing("metrics", run)])
    protocol = metrics.get("protocol") or _get(run["config"], "eval", "protocol")
    queries = html.escape(fmt_value(metrics.get("n_queries")))
    parts.append(f"<p>Test metrics, protocol <b>{html.escape(str(protocol))}</b> "
                 f"({queries} queries, full catalogue):</p>")  # fmt: skip
    methods = metric_comparison(run)
    names = list(dict.fromkeys(k for values in methods.values() for k in values))
    if names:
        parts.append(
            _table(["metric", *methods], [[n, *(v.get(n) for v in methods.values())] for n in names])
        )
    facts = [[k, v] for k, v in metrics.items() if not _QUALITY.match(k) and k != "protocol"]
    return "".join([*parts, _table(["run", "value"], facts)])


def training_section(run: dict[str, Any], charts: Charts) -> str:
    """Loss and validation metrics per epoch: one chart panel per metric, then the history table."""
    history = run["history"]
    if not history:
        return _missing("history", run)
    valid = list(dict.fromkeys(k for r in history for k in r if k.startswith("valid_")))
    valid.sort(key=lambda k: metric_order(k.removeprefix("valid_")))  # history.json sorts keys as text
    panels: dict[str, list[str]] = {"loss": ["loss"]}
    for key in valid:  # one panel per metric, one line per cut-off: valid_ndcg@5 and @10 share "ndcg"
        panels.setdefault(key.removeprefix("valid_").split("@")[0], []).append(key)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.2 * cols, 2.9 * rows)
    best = _get(run["metrics"], "best_epoch")
    for i, (title, keys) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key in keys:
            values = [float(r[key]) if is_number(r.get(key)) else math.nan for r in history]
            label = _plain("@" + key.split("@")[1]) if len(keys) > 1 and "@" in key else None
            ax.plot([r["epoch"] for r in history], values, marker="o", ms=3, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if is_number(best):  # the epoch whose weights early stopping kept
            ax.axvline(best, color="grey", ls=":", lw=1)
        name = title if len(keys) > 1 else keys[0].removeprefix("valid_")
        ax.set_title(_plain(name if name == "loss" else f"validation {name}"), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    parts = [charts.save(fig, "training.png", "training loss and validation metrics per epoch")]
    if is_number(best):
        parts.append(f"<p>Dotted line: the best epoch ({best}), whose weights the run kept.</p>")
    if not valid:
        parts.append(_missing("valid"))
    columns = ["epoch", "loss", "examples_per_s", "seconds", *valid]
    return "".join([*parts, _table(columns, [[r.get(c) for c in columns] for r in history])])


def recall_section(run: dict[str, Any], curves: dict[str, dict[int, float]], charts: Charts) -> str:
    """Recall at each cut-off K: the run's own test metrics and the given ``curves``, chart and table."""
    own: dict[int, float] = {}
    for key, value in (run["metrics"] or {}).items():
        match = _RECALL.match(key)
        if match and is_number(value):
            own[int(match.group(1) or match.group(2))] = float(value)
    if len(own) < 2 and not curves:
        return _missing("recall")
    kind = "top-K accuracy" if any(k.startswith("top") for k in (run["metrics"] or {})) else "recall@K"
    lines = ({f"this run ({kind})": own} if own else {}) | curves
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    for label, points in lines.items():
        ax.plot(sorted(points), [points[k] for k in sorted(points)], marker="o", label=_plain(label))
    ks = sorted({k for points in lines.values() for k in points})
    if ks[-1] >= 10 * ks[0]:  # cut-offs like 1..100 read better on a log axis
        ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="K (cut-off)", ylabel="recall@K", ylim=(0, None))
    img = charts.save(fig, "recall.png", "recall at each cut-off K")
    return img + _table(["model", *(f"@{k}" for k in ks)], [[n, *map(p.get, ks)] for n, p in lines.items()])


def examination_section(run: dict[str, Any], truth: dict[str, list[float]], charts: Charts) -> str:
    """The ranker's learned examination curves beside the true ones (``truth``), per context value."""
    ranker = run["ranker"]
    learned = _get(ranker, "examination_curve") or {}
    parts = [_missing("ranker", run) if ranker is None else "" if learned else _missing("bias")]
    if not learned and not truth:
        return "".join(parts)
    # Learned curves are relative to position 1 (reranker._curves): the true ones are scaled the same way.
    scaled = {c: [v / values[0] for v in values] if values[0] > 0 else values for c, values in truth.items()}
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    for i, context in enumerate(dict.fromkeys([*learned, *scaled])):
        for curves, style, kind in ((learned, "-o", "learned"), (scaled, "--", "true")):
            y, label = curves.get(context), _plain(f"{context} ({kind})")
            if y:
                ax.plot(range(1, len(y) + 1), y, style, color=f"C{i % 10}", label=label)
    ax.set(xlabel="position", ylabel="P(examined | position) / P(examined | 1)", ylim=(0, None))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    parts.append(charts.save(fig, "examination.png", "examination per position and context"))
    column = html.escape(str(_get(ranker, "context", "column") or "none")) if ranker else "(no ranker)"
    # A ranker trained on a real log has no true curve to draw beside it.
    lines = "; dashed: true. Both relative" if scaled else ". Relative"
    parts.append(f"<p>Context column {column}. Solid: learned by the ranker's bias tower{lines} "
                 "to position 1.</p>")  # fmt: skip
    both = [c for c in learned if c in scaled]
    gaps = [[c, max(abs(a - b) for a, b in zip(learned[c], scaled[c], strict=False))] for c in both]
    if gaps:
        parts.append(_table(["context", "max |learned - true| over positions"], gaps))
    summary = _get(ranker, "summary")
    if isinstance(summary, dict) and summary:
        parts.append(_table(["ranker training", "value"], [[k, v] for k, v in summary.items()]))
    return "".join(parts)


def funnel_section(funnel: dict[str, dict[str, float]] | None, run: dict[str, Any] | None = None) -> str:
    """One row per funnel stage, one column per metric any stage has (else why there is none)."""
    if not funnel:
        return _missing("funnel", run)
    columns = list(dict.fromkeys(m for metrics in funnel.values() for m in metrics))
    return _table(["stage", *columns], [[s, *(v.get(m) for m in columns)] for s, v in funnel.items()])


def notes_section(notes: list[str]) -> str:
    """The notes as an escaped bullet list."""
    if not notes:
        return _missing("notes")
    return "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
