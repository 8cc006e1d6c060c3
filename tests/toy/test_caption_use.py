"""experiments/toy/caption_use.py: does the base draw what its caption names?"""

import json
import sys

import pytest

from relvid.toy import world
from tests.helpers.scripts import load_script


def test_changed_captions_name_other_subjects_and_keep_pairs_distinct():
    m = load_script("caption_use")
    for a, b in world.test_pairs():
        for kind in ("shapes changed", "colours changed"):
            x, y = m.captioned_subjects(kind, a, b)
            assert x != a and y != b and x != y
            assert world.EXEMPLAR_COLOUR not in (x.colour, y.colour)
            if kind == "shapes changed":
                assert (x.colour, y.colour) == (a.colour, b.colour) and x.shape != y.shape
            else:
                assert (x.shape, y.shape) == (a.shape, b.shape) and x.colour != y.colour
    assert m.captioned_subjects("empty", a, b) is None
    with pytest.raises(ValueError, match="unknown caption kind"):
        m.captioned_subjects("reversed", a, b)


def test_base_restores_shown_subjects_from_low_noise_whatever_the_caption(tmp_path, monkeypatch, capsys):
    """From little noise the input decides: every caption gives the shown subjects back, and a caption
    that names other subjects is not obeyed."""
    m = load_script("caption_use")
    out = tmp_path / "caption_use.json"
    monkeypatch.setattr(sys, "argv",
                        ["caption_use.py", "--clips", "3", "--sigmas", "0.3", "--frames", "1", "--steps", "3",
                                      "--json", str(out)])
    m.main()
    assert "| 0.3 |" in capsys.readouterr().out
    figures = json.loads(out.read_text())["results"]["0.3"]
    assert all(figures[k]["shown"] == 1.0 for k in m.CAPTIONS)
    assert figures["shapes changed"]["asked"] == figures["colours changed"]["asked"] == 0.0
    assert figures["empty"]["asked"] is None
    monkeypatch.setattr(sys, "argv", ["caption_use.py", "--sigmas", "0,0.9"])
    with pytest.raises(SystemExit):
        m.main()
    assert "every level must be above 0" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["caption_use.py", "--base", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="no config.json"):
        m.main()


def test_word_choices_change_one_word_of_subject_1_and_keep_the_pair_apart():
    m = load_script("caption_use")
    for a, b in world.test_pairs():
        shapes = m.word_choices("shape", a, b)
        assert shapes[0] == a and sorted(s.shape for s in shapes) == sorted(world.SHAPES)
        assert {s.colour for s in shapes} == {a.colour}
        colours = m.word_choices("colour", a, b)
        assert colours[0] == a and len(set(colours)) == len(colours) >= 4
        assert {s.shape for s in colours} == {a.shape}
        assert all(s.colour not in (b.colour, world.EXEMPLAR_COLOUR) for s in colours)
    with pytest.raises(ValueError, match="unknown kind of word"):
        m.word_choices("size", a, b)


def test_one_step_mode_finds_the_committed_base_reading_colour_words(tmp_path, monkeypatch, capsys):
    """The committed base follows colour words (its clean prediction with the right colour is far
    better than with the others), so the one-step figures must show it; written as JSON too."""
    m = load_script("caption_use")
    out = tmp_path / "one_step.json"
    monkeypatch.setattr(sys, "argv",
                        ["caption_use.py", "--one-step", "--clips", "6", "--sigmas", "0.9", "--frames", "1",
                                      "--json", str(out)])
    m.main()
    assert "colour words: right lowest" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["mode"] == "one-step"
    colour, shape = saved["results"]["0.9"]["colour"], saved["results"]["0.9"]["shape"]
    assert colour["gap"] > 0.15 and colour["lowest"] > colour["chance"]
    assert shape["chance"] == pytest.approx(0.25) and 0.0 <= shape["lowest"] <= 1.0
