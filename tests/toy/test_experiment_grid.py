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
    grid = _grid_module()
    assert grid.SAME_RUN  # QK/V is DreamRelation's default placement
    for row, source in grid.SAME_RUN.items():
        assert METHODS[row].frozen == METHODS[source].frozen
        a = method_config(METHODS[row], "approaching", tmp_path / "cache", tmp_path / "out")
        b = method_config(METHODS[source], "approaching", tmp_path / "cache", tmp_path / "out")
        assert OmegaConf.to_container(a, resolve=True) == OmegaConf.to_container(b, resolve=True)
    # a row that differs is never reused
    other = method_config(METHODS["placement_q_kv"], "approaching", tmp_path / "cache", tmp_path / "out")
    assert OmegaConf.to_container(other, resolve=True) != OmegaConf.to_container(
        method_config(METHODS["dreamrelation"], "approaching", tmp_path / "cache", tmp_path / "out"), resolve=True)
