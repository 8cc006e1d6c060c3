"""The Table-1-shaped results files."""

import csv
import json

from relvid.eval.report import write_results


def test_results_table_files(tmp_path):
    rows = [
        {"method": "Mochi", "relation_accuracy": {"mean": 0.2623, "std": 0.01}, "clip_t": 0.3237,
         "temporal_consistency": 0.9888, "fvd": 2047.0},
        {"method": "DreamRelation", "fvd": 2080.0, "relation_accuracy": {"mean": 0.4452, "std": 0.02},
         "unparseable": 3},
    ]
    paths = write_results(rows, tmp_path / "out", stem="table1")
    md = paths["md"].read_text()
    header = md.splitlines()[0]
    # the paper's column order, whatever the row order
    assert header.index("Relation Accuracy") < header.index("CLIP-T") < header.index("Temporal") < header.index("FVD")
    assert "0.4452 ± 0.0200" in md and "| Mochi |" in md and "–" in md  # missing cell shown as a dash
    table = list(csv.DictReader(paths["csv"].open()))
    assert table[1]["relation_accuracy_mean"] == "0.4452" and table[0]["clip_t"] == "0.3237"
    assert table[1]["clip_t"] == "" and table[1]["unparseable"] == "3"
    data = json.loads(paths["json"].read_text())
    assert data["rows"] == rows
    assert data["columns"][:4] == ["relation_accuracy", "clip_t", "temporal_consistency", "fvd"]
