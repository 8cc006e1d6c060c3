"""The experiment grid reuses a run for a row only when the two rows' configs are the same."""

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

from relvid.toy.customize import METHODS, method_config

RUN_PY = Path(__file__).resolve().parents[2] / "experiments" / "toy" / "run.py"


def _grid_module():
    spec = importlib.util.spec_from_file_location("toy_grid", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reused_rows_have_identical_configs(tmp_path):
    def resolved(method: str) -> dict:
        cfg = method_config(METHODS[method], "approaching", tmp_path / "cache", tmp_path / "out")
        return OmegaConf.to_container(cfg, resolve=True)

    grid = _grid_module()
    assert grid.SAME_RUN  # QK/V is DreamRelation's default placement
    for row, source in grid.SAME_RUN.items():
        assert METHODS[row].frozen == METHODS[source].frozen
        assert resolved(row) == resolved(source)
    assert resolved("placement_q_kv") != resolved("dreamrelation")  # a row that differs is never reused
