"""A one-page HTML report of a retrieval run: what was trained, how it trained, how well it retrieves.

``build_report(run_dir)`` writes ``RUN_DIR/report.html`` and its PNG charts in ``RUN_DIR/report/`` from
whatever the run holds (config, metrics, history, model.json, demo_summary.json, ranker/ranker.json):
inline CSS, images by relative path, no JavaScript, nothing fetched, so it can be archived with the run.
A section whose data is missing says what is missing and how to get it: a half-finished run is exactly
when one wants to look, so a missing or unreadable file never fails the report (a malformed ``extra``
does). Every string from a file or from ``extra`` is HTML-escaped.
"""

from __future__ import annotations

import html
import io
import math
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from twotower import __version__
from twotower.funnel_metrics import funnel_table
from twotower.reranker import FORMAT as RANKER_FORMAT
from twotower.reranker import RANKER_DIR
from twotower.storage import atomic_write_bytes, atomic_write_text, read_json

__all__ = ["FUNNEL_FILE", "build_report", "summary_table"]

# What a run stores for the sections training alone cannot fill (written by `twotower demo`): the same
# keys as ``extra``, so `twotower report RUN_DIR` rebuilds the demo's report from the run alone.
FUNNEL_FILE = "funnel.json"

EXTRA_KEYS = ("recall_curves", "true_examination", "funnel", "notes")
IMAGES = ("training.png", "recall.png", "examination.png")
_QUALITY = re.compile(r"^(?:[a-z]+@(\d+)|top(\d+)_accuracy)$")  # test metrics, as evaluate.py names them
_RECALL = re.compile(r"^(?:recall@(\d+)|top(\d+)_accuracy)$")  # top-K accuracy is recall of one target
_CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ccc;margin-top:1.8em}table{border-collapse:collapse;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.25em .6em}td.n{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f3f3f3;text-align:left}.missing{color:#666;font-style:italic}img{max-width:100%}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}dd{margin:0}"""


# Where each file the report reads lives in a run.
_FILES = {
    "config": "config.yaml", "metrics": "metrics.json", "history": "history.json",
    "model": "model.json", "demo": "demo_summary.json", "ranker": f"{RANKER_DIR}/ranker.json",
    "stored": FUNNEL_FILE,
}  # fmt: skip
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


# ------------------------------------------------------------------------------------------ reading
def _layout_ok(key: str, value: Any) -> bool:
    """Whether a file has the layout this version writes (an older or foreign one is reported, not used)."""
    if key == "history":
        return isinstance(value, list) and all(isinstance(r, dict) and _number(r.get("epoch")) for r in value)
    if not isinstance(value, dict):
        return False
    if key == "ranker":  # curves must be lists of numbers to be drawn
        curves = value.get("examination_curve") or {}
        valid = isinstance(curves, dict) and all(
            isinstance(c, list) and c and all(map(_number, c)) for c in curves.values()
        )
        return value.get("format") == RANKER_FORMAT and valid
    return key != "demo" or isinstance(value.get("metrics"), dict)


def _load(root: Path) -> dict[str, Any]:
    """Every file the report uses, ``{key: value or None}``, plus ``problems``: {key: why it was not used}."""
    run: dict[str, Any] = {"problems": {}}
    for key, name in _FILES.items():
        path, run[key] = root / name, None
        if not path.exists():
            continue
        try:
            value = yaml.safe_load(path.read_text()) if name.endswith(".yaml") else read_json(path)
        except (OSError, ValueError, yaml.YAMLError) as exc:  # a truncated or foreign file
            run["problems"][key] = f"{name} is unreadable ({type(exc).__name__}: {exc})"
            continue
        if _layout_ok(key, value):
            run[key] = value
        else:
            run["problems"][key] = f"{name} does not have the layout this version of twotower writes"
    return run


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _comparison(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Test metrics per method: this run, then the demo's baselines computed on the same split."""
    own = {k: v for k, v in (run["metrics"] or {}).items() if _QUALITY.match(k) and _number(v)}
    methods = {"this run": own} if own else {}
    for method, values in (_get(run["demo"], "metrics") or {}).items():
        # The demo lists the run itself too (same numbers): shown once, as "this run".
        if isinstance(values, dict) and not (own and all(own.get(k) == v for k, v in values.items())):
            methods[str(method)] = {k: v for k, v in values.items() if _number(v)}
    return methods


# ------------------------------------------------------------------------------------- formatting
def _fmt(value: Any) -> str:
    if isinstance(value, float):  # large ones (examples/s) keep one decimal, the rest (metrics) four
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4f}"
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(tag: str, value: Any) -> str:
        numeric = ' class="n"' if tag == "td" and _number(value) else ""
        return f"<{tag}{numeric}>{html.escape(_fmt(value))}</{tag}>"

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


class _Charts:
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


def _summary(run: dict[str, Any]) -> str:
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
    parts.append(f"<p>Test metrics, protocol <b>{html.escape(str(protocol))}</b> "
                 f"({html.escape(_fmt(metrics.get('n_queries')))} queries, full catalogue):</p>")  # fmt: skip
    methods = _comparison(run)
    names = list(dict.fromkeys(k for values in methods.values() for k in values))
    if names:
        parts.append(
            _table(["metric", *methods], [[n, *(v.get(n) for v in methods.values())] for n in names])
        )
    facts = [[k, v] for k, v in metrics.items() if not _QUALITY.match(k) and k != "protocol"]
    return "".join([*parts, _table(["run", "value"], facts)])


def _training(run: dict[str, Any], charts: _Charts) -> str:
    history = run["history"]
    if not history:
        return _missing("history", run)
    valid = list(dict.fromkeys(k for r in history for k in r if k.startswith("valid_")))
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
            values = [float(r[key]) if _number(r.get(key)) else math.nan for r in history]
            label = _plain("@" + key.split("@")[1]) if len(keys) > 1 and "@" in key else None
            ax.plot([r["epoch"] for r in history], values, marker="o", ms=3, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if _number(best):  # the epoch whose weights early stopping kept
            ax.axvline(best, color="grey", ls=":", lw=1)
        name = title if len(keys) > 1 else keys[0].removeprefix("valid_")
        ax.set_title(_plain(name if name == "loss" else f"validation {name}"), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    parts = [charts.save(fig, "training.png", "training loss and validation metrics per epoch")]
    if _number(best):
        parts.append(f"<p>Dotted line: the best epoch ({best}), whose weights the run kept.</p>")
    if not valid:
        parts.append(_missing("valid"))
    columns = ["epoch", "loss", "examples_per_s", "seconds", *valid]
    return "".join([*parts, _table(columns, [[r.get(c) for c in columns] for r in history])])


def _recall(run: dict[str, Any], curves: dict[str, dict[int, float]], charts: _Charts) -> str:
    own: dict[int, float] = {}
    for key, value in (run["metrics"] or {}).items():
        match = _RECALL.match(key)
        if match and _number(value):
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


def _examination(run: dict[str, Any], truth: dict[str, list[float]], charts: _Charts) -> str:
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
    parts.append(f"<p>Context column {column}. Solid: learned by the ranker's bias tower; dashed: true. "
                 "Both relative to position 1.</p>")  # fmt: skip
    both = [c for c in learned if c in scaled]
    gaps = [[c, max(abs(a - b) for a, b in zip(learned[c], scaled[c], strict=False))] for c in both]
    if gaps:
        parts.append(_table(["context", "max |learned - true| over positions"], gaps))
    summary = _get(ranker, "summary")
    if isinstance(summary, dict) and summary:
        parts.append(_table(["ranker training", "value"], [[k, v] for k, v in summary.items()]))
    return "".join(parts)


def _funnel(funnel: dict[str, dict[str, float]] | None) -> str:
    if not funnel:
        return _missing("funnel")
    columns = list(dict.fromkeys(m for metrics in funnel.values() for m in metrics))
    return _table(["stage", *columns], [[s, *(v.get(m) for m in columns)] for s, v in funnel.items()])


def _notes(notes: list[str]) -> str:
    if not notes:
        return _missing("notes")
    return "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"


# ------------------------------------------------------------------------------------------- public
def _check_extra(extra: dict[str, Any] | None) -> dict[str, Any]:
    """Validated ``extra``: a misspelt key or a wrong shape is an error, never a chart silently not drawn."""
    extra = dict(extra or {})
    if unknown := sorted(set(extra) - set(EXTRA_KEYS)):
        raise ValueError(f"unknown extra keys {unknown}; known: {list(EXTRA_KEYS)}")
    try:
        given = (extra.get("recall_curves") or {}).items()
        curves = {str(c): {int(k): float(v) for k, v in p.items()} for c, p in given}
        truth = {str(c): [float(v) for v in p] for c, p in (extra.get("true_examination") or {}).items()}
        cut_offs = [k for points in curves.values() for k in points]
        if not all([*curves.values(), *truth.values()]) or any(k < 1 for k in cut_offs):
            raise ValueError("a curve is empty or has a cut-off K < 1")
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"extra recall_curves must be {{label: {{K: value}}}} and true_examination "
                         f"{{context: [value per position]}}, none empty: {exc}") from None  # fmt: skip
    if funnel := extra.get("funnel"):
        funnel_table(funnel)  # the same type checks (and errors) as the markdown table
    notes = extra.get("notes") or []
    if isinstance(notes, str) or not all(isinstance(n, str) for n in notes):
        raise TypeError("extra notes must be a list of strings")
    return {"recall_curves": curves, "true_examination": truth, "funnel": funnel, "notes": list(notes)}


def _open_run(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    root = Path(run_dir)
    if not any((root / name).exists() for name in ("config.yaml", "metrics.json", "history.json")):
        raise FileNotFoundError(f"{root} is not a run directory (no config.yaml, metrics.json, history.json)")
    return root, _load(root)


def build_report(
    run_dir: str | Path, out: str | Path | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Write the run's HTML report and return its path.

    ``out`` is the HTML file (default ``RUN_DIR/report.html``; an existing directory gets a report.html);
    the charts go in the folder beside it named after it (``report/``). ``extra`` may hold
    ``recall_curves`` ``{label: {K: value}}``, ``true_examination`` ``{context: [value per position]}``,
    ``funnel`` ``{stage: {metric: value}}`` and ``notes`` ``[str]``; keys it does not give come from
    the run's ``funnel.json`` when there is one.
    """
    root, run = _open_run(run_dir)
    stored = {k: v for k, v in (run["stored"] or {}).items() if k in EXTRA_KEYS}
    try:
        _check_extra(stored)
    except (ValueError, TypeError):  # a damaged file must not cost the rest of the report
        stored = {}
    more = _check_extra({**stored, **(extra or {})})
    path = root / "report.html" if out is None else Path(out)
    path = path / "report.html" if path.is_dir() else path if path.suffix else path.with_suffix(".html")
    charts = _Charts(path.parent / path.stem)  # created by the first chart written
    sections = [
        ("summary", "Summary", _summary(run)),
        ("training", "Training curves", _training(run, charts)),
        ("recall", "Recall@K", _recall(run, more["recall_curves"], charts)),
        ("examination", "Examination curves", _examination(run, more["true_examination"], charts)),
        ("funnel", "Funnel", _funnel(more["funnel"])),
        ("notes", "Notes", _notes(more["notes"])),
    ]
    for name in set(IMAGES) - charts.written:  # an earlier report's chart whose data is gone must not linger
        (charts.folder / name).unlink(missing_ok=True)
    title = f"twotower report: {root.resolve().name}"
    toc = " · ".join(f'<a href="#{key}">{heading}</a>' for key, heading, _ in sections)
    body = "".join(f'<h2 id="{key}">{heading}</h2>{content}' for key, heading, content in sections)
    stamp = f"{root.resolve()} · twotower {__version__} · {time.strftime('%Y-%m-%d %H:%M')}"
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(stamp)}</p>"
        f"<p>{toc}</p>{body}</body></html>\n"
    )
    atomic_write_text(path, page)  # last: every image it names is already in place
    return path


def summary_table(run_dir: str | Path) -> str:
    """The headline test metrics as a plain-text table (this run beside any demo baselines)."""
    root, run = _open_run(run_dir)
    metrics = run["metrics"]
    if metrics is None:
        why = run["problems"].get("metrics", "metrics.json is missing")
        return f"{root}: no test metrics ({why}); `twotower evaluate {root}` computes them"
    methods = _comparison(run)
    names = list(dict.fromkeys(k for values in methods.values() for k in values))
    rows = [["metric", *methods], *([n, *(_fmt(v.get(n)) for v in methods.values())] for n in names)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"protocol {metrics.get('protocol')}, {metrics.get('n_queries')} queries"]
    for row in rows:  # names left-aligned, numbers right-aligned
        cells = (cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        lines.append("  ".join([row[0].ljust(widths[0]), *cells]))
    if _number(metrics.get("epochs_run")):
        best, seconds = metrics.get("best_epoch"), _fmt(metrics.get("train_seconds"))
        lines.append(f"{metrics['epochs_run']} epochs (best {best}), {seconds} s training")
    return "\n".join(lines)
