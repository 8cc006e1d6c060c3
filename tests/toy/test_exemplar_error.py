"""experiments/toy/exemplar_error.py: fit inside and outside the subjects, per adapter set."""

import sys

import pytest

from relvid.toy.drivers.datasets import build_exemplar_cache
from tests.helpers.scripts import load_script


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
    title, line = capsys.readouterr().out.strip().splitlines()
    inside, outside = float(line.split()[2]), float(line.split()[4])
    assert title == "sigma ~ U(0, 1):"
    assert line.startswith("base") and inside > outside > 0  # the base errs most where the subjects are
    monkeypatch.setattr(sys, "argv", ["exemplar_error.py", "--cache", str(cache), "--relation", "orbiting"])
    with pytest.raises(SystemExit, match="no clips of relation 'orbiting'"):
        m.main()
    monkeypatch.setattr(sys, "argv", ["exemplar_error.py", "--cache", str(cache), "--relation", "moving_apart",
                                      str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="relvid_adapters.safetensors not found"):
        m.main()


def test_base_hedges_on_layout_at_high_noise_only(tmp_path, monkeypatch, capsys):
    """The committed base never saw the staged exemplars' layout: from nearly pure noise its predicted
    clean video paints some subject where the exemplars have background; from little noise it does not."""
    m = load_script("exemplar_error")
    cache = tmp_path / "cache"
    build_exemplar_cache(cache, ["moving_apart"], clips=4, progress=False)
    monkeypatch.setattr(sys, "argv", ["exemplar_error.py", "--cache", str(cache), "--relation", "moving_apart",
                                      "--sigmas", "0.1,0.98"])
    m.main()
    lines = capsys.readouterr().out.strip().splitlines()
    assert [lines[0], lines[2]] == ["sigma 0.1:", "sigma 0.98:"]
    low, high = (float(line.split()[-1]) for line in (lines[1], lines[3]))
    assert high > 0.5 and abs(low) < 0.1 < high - low
    for bad, why in (("1.5", "must lie in"), ("0.5;0.9", "comma-separated numbers")):
        monkeypatch.setattr(sys, "argv", ["exemplar_error.py", "--cache", str(cache), "--relation", "moving_apart",
                                          "--sigmas", bad])
        with pytest.raises(SystemExit):
            m.main()
        assert why in capsys.readouterr().err


def test_subject_direction_points_from_background_to_subject():
    import torch

    m = load_script("exemplar_error")
    z0 = torch.zeros(1, 3, 1, 2, 2)
    z0[0, :, 0, 0, 0] = torch.tensor([3.0, 0.0, 4.0])  # the one subject cell
    mask = torch.zeros(1, 1, 1, 2, 2)
    mask[0, 0, 0, 0, 0] = 1
    assert torch.allclose(m.subject_direction(z0, mask), torch.tensor([0.6, 0.0, 0.8]))
