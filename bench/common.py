"""What every benchmark shares: machine description, the JSON rows of bench-format.md, the markdown table."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import statistics
from pathlib import Path

import torch

from twotower.storage import atomic_write_text, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_ML100K = ROOT.parent / "shared" / "data" / "ml-100k"


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def measured_rows(base: dict, values: dict[str, list[float]], seeds: list[int]) -> list[dict]:
    """One row per metric: mean, std (0 for a single seed) and the per-seed values."""
    return [
        {**base, "metric": metric, "mean": statistics.fmean(vals), "std": _std(vals), "values": vals,
         "seeds": seeds}
        for metric, vals in values.items()
    ]  # fmt: skip


def _std(values: list[float]) -> float:
    """Sample std; 0 for a single seed, NaN when a value is not finite (statistics.stdev then raises an
    AttributeError on Python 3.11, which lost the whole bench run over one undefined metric)."""
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) if all(map(math.isfinite, values)) else math.nan


def result(name: str, command: str, rows: list[dict]) -> dict:
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"benchmark": name, "created": created, "machine": machine(), "command": command, "rows": rows}


def markdown(res: dict) -> str:
    """The rows as one table per (dataset, protocol): methods down, metrics across, anchors marked."""
    m = res["machine"]
    lines = [f"# {res['benchmark']}", "", f"`{res['command']}` on {m['cores']} cores, torch {m['torch']}, "
             f"{res['created']}. Mean ± std over the listed seeds.", ""]  # fmt: skip
    groups = dict.fromkeys((r["dataset"], r["protocol"]) for r in res["rows"])
    for dataset, protocol in groups:
        rows = [r for r in res["rows"] if (r["dataset"], r["protocol"]) == (dataset, protocol)]
        metrics = list(dict.fromkeys(r["metric"] for r in rows))
        lines += [f"## {dataset}, protocol `{protocol}`", "", "| method | " + " | ".join(metrics) + " |",
                  "|---" * (len(metrics) + 1) + "|"]  # fmt: skip
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = []
            for metric in metrics:
                row = next((r for r in rows if r["method"] == method and r["metric"] == metric), None)
                cells.append("" if row is None else _cell(row))
            tag = " (published)" if any(r.get("anchor") for r in rows if r["method"] == method) else ""
            lines.append(f"| {method}{tag} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(row: dict) -> str:
    """Mean ± std, or the mean alone (a published anchor, one seed, no finite std). A row read back
    from a saved file has null where write_json met a NaN or an infinity: such a mean prints as nan."""
    mean, std = row["mean"], row.get("std")
    text = "nan" if mean is None else f"{mean:.4g}"
    if row.get("anchor") or not (std and math.isfinite(std)):
        return text
    return f"{text} ± {std:.2g}"


def write(res: dict, out: Path = RESULTS) -> str:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{res['benchmark']}.json", res)
    text = markdown(res)
    atomic_write_text(out / f"{res['benchmark']}.md", text)
    return text
