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
import math
import time
from pathlib import Path
from typing import Any

import yaml

from twotower import __version__
from twotower.funnel_metrics import funnel_table
from twotower.report_sections import (
    Charts,
    examination_section,
    fmt_value,
    funnel_section,
    is_number,
    metric_comparison,
    notes_section,
    recall_section,
    summary_section,
    training_section,
)
from twotower.run_ranker import FORMAT as RANKER_FORMAT
from twotower.run_ranker import RANKER_DIR
from twotower.storage import atomic_write_text, read_json

__all__ = ["FUNNEL_FILE", "build_report", "summary_table"]

# What a run stores for the sections training alone cannot fill (written by `twotower demo`): the same
# keys as ``extra``, so `twotower report RUN_DIR` rebuilds the demo's report from the run alone.
FUNNEL_FILE = "funnel.json"

EXTRA_KEYS = ("recall_curves", "true_examination", "funnel", "notes")
IMAGES = ("training.png", "recall.png", "examination.png")
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


# ------------------------------------------------------------------------------------------ reading
def _layout_ok(key: str, value: Any) -> bool:
    """Whether a file has the layout this version writes (an older or foreign one is reported, not used)."""
    if key == "history":
        return isinstance(value, list) and all(
            isinstance(r, dict) and is_number(r.get("epoch")) for r in value
        )
    if not isinstance(value, dict):
        return False
    if key == "ranker":  # curves must be lists of numbers to be drawn
        curves = value.get("examination_curve") or {}
        valid = isinstance(curves, dict) and all(
            isinstance(c, list) and c and all(map(is_number, c)) for c in curves.values()
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


# ------------------------------------------------------------------------------------------- public
def _check_extra(extra: dict[str, Any] | None) -> dict[str, Any]:
    """Validated ``extra``: a misspelt key or a wrong shape is an error, never a chart silently not drawn."""
    extra = dict(extra or {})
    if unknown := sorted(set(extra) - set(EXTRA_KEYS)):
        raise ValueError(f"unknown extra keys {unknown}; known: {list(EXTRA_KEYS)}")
    try:
        given = (extra.get("recall_curves") or {}).items()
        curves = {str(c): {int(k): _number(v) for k, v in p.items()} for c, p in given}
        truth = {str(c): [_number(v) for v in p] for c, p in (extra.get("true_examination") or {}).items()}
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


def _number(value: Any) -> float:
    """A curve point as a float. None is how funnel.json holds a NaN (write_json writes null): a gap
    in the chart, as the NaN itself is, not a reason to drop the stored file."""
    return math.nan if value is None else float(value)


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
    except (ValueError, TypeError) as exc:  # a damaged file must not cost the rest of the report
        stored = {}
        run["problems"]["funnel"] = f"{FUNNEL_FILE} was not used: {exc}"
    more = _check_extra({**stored, **(extra or {})})
    path = root / "report.html" if out is None else Path(out)
    path = path / "report.html" if path.is_dir() else path if path.suffix else path.with_suffix(".html")
    charts = Charts(path.parent / path.stem)  # created by the first chart written
    sections = [
        ("summary", "Summary", summary_section(run)),
        ("training", "Training curves", training_section(run, charts)),
        ("recall", "Recall@K", recall_section(run, more["recall_curves"], charts)),
        ("examination", "Examination curves", examination_section(run, more["true_examination"], charts)),
        ("funnel", "Funnel", funnel_section(more["funnel"], run)),
        ("notes", "Notes", notes_section(more["notes"])),
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
    methods = metric_comparison(run)
    names = list(dict.fromkeys(k for values in methods.values() for k in values))
    rows = [["metric", *methods], *([n, *(fmt_value(v.get(n)) for v in methods.values())] for n in names)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"protocol {metrics.get('protocol')}, {metrics.get('n_queries')} queries"]
    for row in rows:  # names left-aligned, numbers right-aligned
        cells = (cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        lines.append("  ".join([row[0].ljust(widths[0]), *cells]))
    if is_number(metrics.get("epochs_run")):
        best, seconds = metrics.get("best_epoch"), fmt_value(metrics.get("train_seconds"))
        kept = "" if best is None else f" (best {best})"  # best epoch: only with early stopping
        lines.append(f"{metrics['epochs_run']} epochs{kept}, {seconds} s training")
    return "\n".join(lines)
