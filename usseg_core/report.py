"""Aggregating many runs' results into one comparison: mean, spread and range per row, and the page that
shows them (markdown for Prefect, a self-contained HTML file for a browser). No IO besides the HTML's images.

A *run row* is one row of an evaluation's results table (``method``, ``clusterer``, ``crf``, ``accuracy``,
``miou``, ``iou_<class>``...) tagged with the ``seed`` of the run that produced it. Rows of one
(method, clusterer, crf) over several seeds become one *summary row*.
"""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

ROW_KEY = ("method", "clusterer", "crf")
METRICS = ("accuracy", "miou")
IOU_PREFIX = "iou_"


def _stats(values: Sequence[float]) -> dict:
    """n, mean, sample standard deviation (ddof = 1; None for a single run), min and max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values)}


def summarise(rows: Iterable[dict]) -> list[dict]:
    """One summary row per (method, clusterer, crf), in first-seen order.

    Each holds ``n`` (runs), ``seeds``, ``<metric>_mean / _std / _min / _max`` for accuracy and mIoU and
    ``iou_<class>_mean / _std`` per class (classes absent from a run's labels are skipped for that run).
    The standard deviation is the sample one (ddof = 1), None when only one run exists.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in ROW_KEY), []).append(r)
    out = []
    for key, runs in groups.items():
        row = dict(zip(ROW_KEY, key))
        row["n"] = len(runs)
        row["seeds"] = [r.get("seed") for r in runs]
        for m in METRICS:
            st = _stats([float(r[m]) for r in runs])
            row.update({f"{m}_{s}": st[s] for s in ("mean", "std", "min", "max")})
        for col in [c for c in runs[0] if c.startswith(IOU_PREFIX)]:
            vals = [float(r[col]) for r in runs if r.get(col) is not None and not _isnan(r[col])]
            if vals:
                st = _stats(vals)
                row[f"{col}_mean"], row[f"{col}_std"] = st["mean"], st["std"]
        out.append(row)
    return out


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def mean_pm(row: dict, metric: str) -> str:
    """``"35.47 ± 0.03"`` (``"35.47"`` for one run)."""
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def span(row: dict, metric: str) -> str:
    return f"{row[f'{metric}_min']:.2f}–{row[f'{metric}_max']:.2f}"


SUMMARY_COLUMNS = ("method", "clusterer", "CRF", "runs", "accuracy (mean ± std)", "accuracy (min–max)",
                   "mIoU (mean ± std)", "mIoU (min–max)")


def summary_cells(row: dict) -> list[str]:
    """The cells of one summary row, in :data:`SUMMARY_COLUMNS` order."""
    return [str(row["method"]), str(row["clusterer"]), "yes" if row["crf"] else "no", str(row["n"]),
            mean_pm(row, "accuracy"), span(row, "accuracy"), mean_pm(row, "miou"), span(row, "miou")]


COMPACT_COLUMNS = ("method", "clusterer", "CRF", "runs", "accuracy", "mIoU")


def compact_cells(row: dict) -> list[str]:
    """A narrower row for terminals: ``mean ± std [min–max]`` per metric."""
    return [str(row["method"]), str(row["clusterer"]), "yes" if row["crf"] else "no", str(row["n"]),
            *(f"{mean_pm(row, m)} [{span(row, m)}]" if row["n"] > 1 else mean_pm(row, m) for m in METRICS)]


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def html_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f0f0f0}
tr:nth-child(even) td{background:#fafafa}img{max-width:100%;border:1px solid #ddd}
code{font-size:.9em}p.note{color:#555;font-size:.85em}"""


def html_page(title: str, blocks: Sequence[tuple[str, str]]) -> str:
    """A self-contained page: ``blocks`` are (heading, HTML body) pairs; images must already be inline."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{b}" for h, b in blocks)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def inline_png(path: str | Path, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a data URI (the page opens without its folder or a server)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"
