"""The results table in the shape of the paper's Table 1: one row per adapter or baseline.

A row is ``{"method": str, "<metric>": float | {"mean": float, "std": float, ...}, ...}``. The
paper's four metrics come first in its order; any other metric follows in first-seen order.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from relvid.files import atomic_write

# metric key -> (column title, higher is better)
PAPER_COLUMNS = {
    "relation_accuracy": ("Relation Accuracy", True),
    "clip_t": ("CLIP-T", True),
    "temporal_consistency": ("Temporal Consistency", True),
    "fvd": ("FVD", False),
}


def _columns(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if "method" not in row:
            raise ValueError(f"write_results: every row needs a 'method', got keys {sorted(row)}")
        for key in row:
            if key != "method" and key not in seen:
                seen.append(key)
    paper = [k for k in PAPER_COLUMNS if k in seen]
    return paper + [k for k in seen if k not in PAPER_COLUMNS]


def _title(key: str) -> str:
    if key in PAPER_COLUMNS:
        title, higher = PAPER_COLUMNS[key]
        return f"{title} {'↑' if higher else '↓'}"
    return key


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        return f"{value['mean']:.4f} ± {value['std']:.4f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    cols = _columns(rows)
    lines = ["| Method | " + " | ".join(_title(c) for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(_cell(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict]) -> str:
    """Flat CSV: a {"mean", "std"} metric becomes two columns, <metric>_mean and <metric>_std."""
    cols = _columns(rows)
    header = ["method"]
    for c in cols:
        is_dist = any(isinstance(r.get(c), dict) for r in rows)
        header += [f"{c}_mean", f"{c}_std"] if is_dist else [c]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat: dict[str, object] = {"method": row["method"]}
        for c in cols:
            v = row.get(c)
            if isinstance(v, dict):
                flat[f"{c}_mean"], flat[f"{c}_std"] = v["mean"], v["std"]
            elif f"{c}_mean" in header:
                flat[f"{c}_mean"] = "" if v is None else v
            else:
                flat[c] = "" if v is None else v
        writer.writerow(flat)
    return buf.getvalue()


def write_results(rows: list[dict], out_dir: str | os.PathLike, stem: str = "results") -> dict[str, Path]:
    """Write <stem>.md, <stem>.csv and <stem>.json into out_dir; returns {"md", "csv", "json"} paths."""
    if not rows:
        raise ValueError("write_results: no rows to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
    atomic_write(paths["md"], markdown_table(rows))
    atomic_write(paths["csv"], csv_table(rows))
    atomic_write(paths["json"], json.dumps({"columns": _columns(rows), "rows": rows}, indent=2) + "\n")
    return paths
