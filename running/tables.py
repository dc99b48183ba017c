"""Summary tables: mean ± std per experiment over its seeds, as text, Markdown and CSV.

One formatter for the terminal (``main.py``), ``summary.md``/``summary.csv``, the report and W&B.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from typing import Any

COLUMNS = [
    ("forget acc", ("metrics", "forget_acc"), 100),
    ("retain acc", ("metrics", "retain_acc"), 100),
    ("test acc", ("metrics", "test_acc"), 100),
    ("MIA eff.", ("metrics", "mia_efficacy"), 100),
    ("avg gap", ("gaps", "avg_gap"), 1),
    ("time s", ("times", "unlearn_time"), 1),
    ("time/oracle", ("times", "time_ratio"), 1),
]
ORACLE_COLUMNS = {
    "forget acc": ("oracle", "forget_acc"),
    "retain acc": ("oracle", "retain_acc"),
    "test acc": ("oracle", "test_acc"),
    "MIA eff.": ("oracle", "mia_efficacy"),
    "time s": ("times", "oracle_time"),
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarize(results: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Mean and std per experiment (and the oracle's, for reference) over its seeds."""
    rows = []
    for folder in order:
        runs = [r for r in results if r["experiment"] == folder]
        if not runs:
            continue
        for who in ("unlearned", "oracle"):
            row: dict[str, Any] = {
                "experiment": folder if who == "unlearned" else f"{folder} (oracle)",
                "method": runs[0]["method"] if who == "unlearned" else "retrain oracle",
                "runs": len(runs),
            }
            for col, (sect, key), scale in COLUMNS:
                if who == "oracle":
                    if col not in ORACLE_COLUMNS:
                        row[col] = (math.nan, math.nan)
                        continue
                    sect, key = ORACLE_COLUMNS[col]
                vals = [r[sect].get(key) for r in runs]
                m, s = _mean_std([v * scale for v in vals if v is not None])
                row[col] = (m, s)
            if who == "unlearned" and all("challenge" in r for r in runs):
                row["score"] = _mean_std([r["challenge"]["score"] for r in runs])
            rows.append(row)
    return rows


def _fmt(ms: tuple[float, float]) -> str:
    m, s = ms
    if math.isnan(m):
        return "-"
    return f"{m:.2f} ± {s:.2f}"


def _headers(rows: list[dict[str, Any]]) -> list[str]:
    h = ["experiment", "runs"] + [c for c, _, _ in COLUMNS]
    return h + (["score"] if any("score" in r for r in rows) else [])


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells (mean ± std), for W&B tables and figures."""
    h = _headers(rows)
    cells = [
        [r["experiment"], str(r["runs"])] + [_fmt(r.get(c, (math.nan, 0))) for c in h[2:]]
        for r in rows
    ]
    return h, cells


def to_markdown(rows: list[dict[str, Any]]) -> str:
    h = _headers(rows)
    lines = ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
    for r in rows:
        cells = [r["experiment"], str(r["runs"])] + [_fmt(r.get(c, (math.nan, 0))) for c in h[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_text(rows: list[dict[str, Any]]) -> str:
    h = _headers(rows)
    table = [h] + [
        [r["experiment"], str(r["runs"])] + [_fmt(r.get(c, (math.nan, 0))) for c in h[2:]]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(h))]
    out = []
    for n, row in enumerate(table):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))))  # fmt: skip
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def to_csv(rows: list[dict[str, Any]]) -> str:
    h = _headers(rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["experiment", "method", "runs"] + [f"{c} {p}" for c in h[2:] for p in ("mean", "std")]
    )
    for r in rows:
        vals = []
        for c in h[2:]:
            m, s = r.get(c, (math.nan, math.nan))
            vals += [f"{m:.6g}", f"{s:.6g}"]
        w.writerow([r["experiment"], r["method"], r["runs"]] + vals)
    return buf.getvalue()
