"""Summary tables: mean ± std per experiment over its seeds, as text, Markdown and CSV.

One formatter for ``summary.md``/``summary.csv``, the report and W&B (:func:`table_cells`);
the terminal gets a compact form of the same numbers, at most 100 columns wide, with each retrain
oracle once (:func:`to_terminal`).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from running.results import RunResult

COLUMNS = [
    ("forget acc", ("metrics", "forget_acc"), 100),
    ("retain acc", ("metrics", "retain_acc"), 100),
    ("test acc", ("metrics", "test_acc"), 100),
    ("MIA eff.", ("metrics", "mia_efficacy"), 100),
    # the 95% interval of MIA-Efficacy over its shadow draws, and the share of runs whose
    # attack was degenerate or unstable (evaluation/mia.py)
    ("MIA low", ("metrics", "mia_efficacy_low"), 100),
    ("MIA high", ("metrics", "mia_efficacy_high"), 100),
    ("MIA flagged", ("metrics", "mia_efficacy_flagged"), 1),
    ("avg gap", ("gaps", "avg_gap"), 1),
    ("time s", ("times", "unlearn_time"), 1),
    ("passes/oracle", ("times", "sample_pass_ratio"), 1),
    ("time/oracle", ("times", "time_ratio"), 1),
]
# the many-model evaluation (running/many_models.py), per experiment: shown only when the
# experiment has one; eps score and U-LiRA in %
EVAL_COLUMNS = [
    ("eps score", ("extra", "eps_score"), 100),
    ("U-LiRA acc", ("extra", "ulira_acc"), 100),
    ("U-LiRA AUC", ("extra", "ulira_auc"), 100),
    ("U-LiRA TPR@1%", ("extra", "ulira_tpr_1pct"), 100),
    ("U-LiRA TPR@0.1%", ("extra", "ulira_tpr_01pct"), 100),
]
# forgetting in the representation (metrics.json repr, evaluation/repr_eval.py): shown only
# when the runs measured it; the oracle rows take the oracle's own numbers
REPR_COLUMNS = [
    ("probe forget", ("repr", "probe_forget_acc"), 100),
    ("probe test-forget", ("repr", "probe_test_forget_acc"), 100),
    ("kNN forget", ("repr", "knn_forget_acc"), 100),
    ("CKA oracle", ("repr", "cka_oracle"), 1),
]
ORACLE_COLUMNS = {
    "forget acc": ("oracle", "forget_acc"),
    "retain acc": ("oracle", "retain_acc"),
    "test acc": ("oracle", "test_acc"),
    "MIA eff.": ("oracle", "mia_efficacy"),
    "MIA low": ("oracle", "mia_efficacy_low"),
    "MIA high": ("oracle", "mia_efficacy_high"),
    "MIA flagged": ("oracle", "mia_efficacy_flagged"),
    "time s": ("times", "oracle_time"),
}


def _get(r: RunResult, sect: str, key: str) -> Any:
    """``r.<sect>[key]``; a dotted sect descends (``repr.oracle``); sections this version
    reads from metrics.json's newer keys (``repr``) come from ``r.extra``."""
    first, *rest = sect.split(".")
    section = getattr(r, first, None)
    section = r.extra.get(first) if section is None else section
    for part in rest:
        section = section.get(part) if isinstance(section, dict) else None
    return section.get(key) if isinstance(section, dict) else None


def _has_repr(results: Sequence[RunResult]) -> bool:
    return any(isinstance(r.extra.get("repr"), dict) for r in results)


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarize(results: Sequence[RunResult], order: list[str]) -> list[dict[str, Any]]:
    """Mean and std per experiment (and the oracle's, for reference) over its seeds."""
    rows = []
    for folder in order:
        runs = [r for r in results if r.experiment == folder]
        if not runs:
            continue
        for who in ("unlearned", "oracle"):
            row: dict[str, Any] = {
                "experiment": folder if who == "unlearned" else f"{folder} (oracle)",
                "method": runs[0].method if who == "unlearned" else "retrain oracle",
                "runs": len(runs),
            }
            for col, (sect, key), scale in COLUMNS:
                if who == "oracle":
                    if col not in ORACLE_COLUMNS:
                        row[col] = (math.nan, math.nan)
                        continue
                    sect, key = ORACLE_COLUMNS[col]
                vals = [getattr(r, sect).get(key) for r in runs]
                m, s = _mean_std([v * scale for v in vals if v is not None])
                row[col] = (m, s)
            for col, (sect, key), scale in EVAL_COLUMNS if who == "unlearned" else []:
                vals = [_get(r, sect, key) for r in runs]
                if any(v is not None for v in vals):
                    row[col] = _mean_std([v * scale for v in vals if v is not None])
            for col, (sect, key), scale in REPR_COLUMNS if _has_repr(runs) else []:
                sect = sect if who == "unlearned" else f"{sect}.oracle"
                vals = [_get(r, sect, key) for r in runs]
                row[col] = _mean_std([v * scale for v in vals if v is not None])
            scores = [r.challenge["score"] for r in runs if r.challenge is not None]
            if who == "unlearned" and len(scores) == len(runs):
                row["score"] = _mean_std(scores)
            rows.append(row)
    return rows


def _fmt(ms: tuple[float, float] | None) -> str:
    if ms is None or ms[0] is None or math.isnan(ms[0]):
        return "-"
    return f"{ms[0]:.2f} ± {ms[1]:.2f}"


def _headers(rows: list[dict[str, Any]]) -> list[str]:
    h = ["experiment", "runs"] + [c for c, _, _ in COLUMNS]
    h += [c for c, _, _ in EVAL_COLUMNS + REPR_COLUMNS if any(c in r for r in rows)]
    return h + (["score"] if any("score" in r for r in rows) else [])


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells (mean ± std) of summary rows: the one formatter behind
    the terminal table, summary.md, the report, its figure and W&B."""
    h = _headers(rows)
    cells = [[str(r["experiment"]), str(r["runs"])] + [_fmt(r.get(c)) for c in h[2:]] for r in rows]
    return h, cells


def markdown_table(table: Sequence[Sequence[str]]) -> str:
    """A Markdown table from a header row and body rows (``|`` in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    head, *body = table
    return "\n".join([line(head), "|" + "---|" * len(head), *map(line, body)])


def to_markdown(rows: list[dict[str, Any]]) -> str:
    h, cells = table_cells(rows)
    return markdown_table([h, *cells])


def to_text(rows: list[dict[str, Any]]) -> str:
    h, cells = table_cells(rows)
    table = [h, *cells]
    widths = [max(len(row[i]) for row in table) for i in range(len(h))]
    out = []
    for n, row in enumerate(table):
        padded = [c.rjust(w) for c, w in zip(row, widths, strict=True)]
        padded[0] = row[0].ljust(widths[0])
        out.append("  ".join(padded))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The terminal table: what main.py prints at the end, at most 100 columns wide

TERMINAL_WIDTH = 100
# (header, section, key, scale): accuracies in %, the gap in points, times in seconds
TERMINAL_COLUMNS = [
    ("forget", "metrics", "forget_acc", 100),
    ("retain", "metrics", "retain_acc", 100),
    ("test", "metrics", "test_acc", 100),
    ("MIA", "metrics", "mia_efficacy", 100),
    ("avg gap", "gaps", "avg_gap", 1),
    ("time", "times", "unlearn_time", 1),
]
TERMINAL_EVAL = [  # only with a many-model evaluation: eps score in %
    ("eps", "extra", "eps_score", 100),
]
# a second block with the same rows, only when the runs measured the representation
TERMINAL_REPR = [(h, "repr", k, 100) for h, (_, k), _ in REPR_COLUMNS]
TERMINAL_ORACLE = {
    **{h: ("repr.oracle", k) for h, _, k, _ in TERMINAL_REPR},
    "forget": ("oracle", "forget_acc"),
    "retain": ("oracle", "retain_acc"),
    "test": ("oracle", "test_acc"),
    "MIA": ("oracle", "mia_efficacy"),
    "time": ("times", "oracle_time"),
}


def _compact(ms: tuple[float, float]) -> str:
    """``mean±std`` in few characters: one decimal (none from 1000 on; the std's from 10 on)."""
    m, s = ms
    if math.isnan(m):
        return "-"
    mean = f"{m:.0f}" if abs(m) >= 1000 else f"{m:.1f}"
    return f"{mean}±{s:.0f}" if s >= 10 else f"{mean}±{s:.1f}"


def _forget_label(r: RunResult) -> str:
    """The forget set of a run in a few characters, as experiment names write it."""
    f = r.forget
    classes = f.get("classes") or []
    if f.get("replace") is not None and classes:
        return f"rp{classes[0]}by{f['replace']}"
    if classes:
        return "cf" + "-".join(map(str, classes))
    if f.get("fraction") is not None:
        return f"unlr{f['fraction']:g}"
    if f.get("index_file"):
        return "itf-" + Path(str(f["index_file"])).stem
    return f"{f.get('n', '?')} samples"


def _cells(
    runs: Sequence[RunResult], oracle: bool, columns: list[tuple[str, str, str, int]]
) -> list[str]:
    out = []
    for header, sect, key, scale in columns:
        if oracle:
            if header not in TERMINAL_ORACLE:
                out.append("")
                continue
            sect, key = TERMINAL_ORACLE[header]
        vals = [_get(r, sect, key) for r in runs]
        out.append(_compact(_mean_std([v * scale for v in vals if v is not None])))
    return out


def to_terminal(
    results: Sequence[RunResult],
    order: list[str],
    width: int = TERMINAL_WIDTH,
    columns: list[tuple[str, str, str, int]] | None = None,
) -> str:
    """Mean ± std per experiment over its seeds, at most `width` columns: each retrain oracle
    once, on the line above the first experiment that compares with it (experiments with the
    same forget set and base model share their oracles), names shortened only if they must be.
    ``summary.md`` and ``summary.csv`` keep every column and a row per experiment and oracle.
    When the runs measured the representation, a second block with the same rows follows
    (`columns`: that block's)."""
    groups: dict[tuple[str, ...], str] = {}
    table: list[list[str]] = []
    counts: list[int] = []
    main = columns is None
    any_score = main and any(r.challenge is not None for r in results)
    columns = list(TERMINAL_COLUMNS) if columns is None else columns
    if main and any("eps_score" in r.extra for r in results):  # next to the avg gap
        at = [c[0] for c in columns].index("avg gap") + 1
        columns = columns[:at] + TERMINAL_EVAL + columns[at:]
    for folder in order:
        runs = [r for r in results if r.experiment == folder]
        if not runs:
            continue
        counts.append(len(runs))
        oracles = tuple(sorted({r.oracle_checkpoint for r in runs}))
        if oracles not in groups:
            label = "(oracle " + _forget_label(runs[0])
            taken = sum(v.split(" #")[0] == label + ")" for v in groups.values())
            groups[oracles] = f"{label})" if not taken else f"{label} #{taken + 1})"
            table.append([groups[oracles], str(len(runs)), *_cells(runs, True, columns)]
                         + ([""] if any_score else []))  # fmt: skip
        scores = [r.challenge["score"] for r in runs if r.challenge is not None]
        score = [_compact(_mean_std(scores)) if len(scores) == len(runs) else "-"]
        table.append([folder, str(len(runs)), *_cells(runs, False, columns)]
                     + (score if any_score else []))  # fmt: skip
    if not table:
        return "no finished runs"
    head = ["experiment", "runs", *[c[0] for c in columns]] + (["score"] * any_score)
    same = len(set(counts)) == 1
    if same:  # the count goes into the caption
        head.pop(1)
        table = [row[:1] + row[2:] for row in table]
    widths = [max(len(row[i]) for row in [head, *table]) for i in range(len(head))]
    room = width - (sum(widths[1:]) + len(widths))  # two spaces after the name, one between
    if widths[0] > room:  # shorten the longest names, keeping their start and end
        widths[0] = max(room, 12)
        for row in table:
            if len(row[0]) > widths[0]:
                keep = widths[0] - 1
                row[0] = row[0][: keep - keep // 2] + "…" + row[0][len(row[0]) - keep // 2 :]
    over = f"over {counts[0]} seed{'s' * (counts[0] > 1)}" if same else "over the runs"
    lines = [f"mean±std {over}: accuracies and MIA in %, avg gap in points, time in s"]
    if not main:
        lines = [f"in the representation, mean±std {over}: accuracy of a linear probe and of kNN "
                 "on the", "penultimate features in %, linear CKA to the oracle's features x100"]  # fmt: skip
    for n, row in enumerate([head, *table]):
        cells = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append((row[0].ljust(widths[0]) + "  " + " ".join(cells)).rstrip())
        if n == 0:
            lines.append("-" * widths[0] + "  " + " ".join("-" * w for w in widths[1:]))
    text = "\n".join(lines)
    if main and _has_repr(results):
        text += "\n\n" + to_terminal(results, order, width, TERMINAL_REPR)
    return text


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
