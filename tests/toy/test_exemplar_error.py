"""experiments/toy/exemplar_error.py: fit inside and outside the subjects, per adapter set."""

import sys

import pytest

from relvid.toy.datasets import build_exemplar_cache
from tests.toy.experiments import load_script


def test_adapter_sets_cover_inference_and_hybrid_mask_steps():
    m = load_script("exemplar_error")
    sets = m.adapter_sets(("relation", "subject1", "subject2", "ffn"), ("relation", "ffn"))
    assert sets[:4] == [("relation", "subject1", "subject2", "ffn"), ("relation", "ffn"),
                        ("subject1", "ffn"), ("subject2", "ffn")]
    assert ("relation",) in sets and ("ffn",) in sets
    assert m.adapter_sets(("direct",), ("direct",)) == [("direct",)]


def test_base_errors_and_clear_refusals(tmp_path, monkeypatch, capsys):
    m = load_script("exemplar_error")
    cache = tmp_path / "cache"
    build_exemplar_cache(cache, ["moving_apart"], clips=2, progress=False)
    monkeypatch.setattr(sys, "argv", ["exemplar_error.py", "--cache", str(cache), "--relation", "moving_apart"])
    m.main()
    line = capsys.readouterr().out.strip()
    inside, outside = float(line.split()[2]), float(line.split()[4])
    assert line.startswith("base") and inside > outside > 0  # the base errs most where the subjects are
    monkeypatch.setattr(sys, "argv", ["exemplar_error.py", "--cache", str(cache), "--relation", "orbiting"])
    with pytest.raises(SystemExit, match="no clips of relation 'orbiting'"):
        m.main()
    monkeypatch.setattr(sys, "argv", ["exemplar_error.py", "--cache", str(cache), "--relation", "moving_apart",
                                      str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="relvid_adapters.safetensors not found"):
        m.main()
