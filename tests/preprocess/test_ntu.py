"""NTU names, the local index with filters and a seeded choice, and the .skeleton parser's odd cases."""

import numpy as np
import pytest

from relvid.preprocess.ntu import NtuName, SkeletonError, choose, filter_samples, index_ntu, parse_skeleton
from tests.helpers.preprocess import standing_body, two_people_frames, write_skeleton


def test_names_parse_and_format():
    name = NtuName.parse("some/dir/S017C003P020R002A120_rgb.avi")
    assert (name.setup, name.camera, name.performer, name.replication, name.action) == (17, 3, 20, 2, 120)
    assert str(name) == "S017C003P020R002A120"
    with pytest.raises(ValueError, match="not an NTU RGB\\+D name"):
        NtuName.parse("holiday.mp4")


def test_index_pairs_videos_with_skeletons_filters_and_chooses_with_a_seed(tmp_path):
    names = [f"S{s:03d}C{c:03d}P{p:03d}R001A{a:03d}"
             for s in (1, 2) for c in (1, 2, 3) for p in (1, 8) for a in (50, 58)]
    for n in names:
        (tmp_path / "rgb" / f"{n}_rgb.avi").parent.mkdir(exist_ok=True)
        (tmp_path / "rgb" / f"{n}_rgb.avi").write_bytes(b"")
        if not n.startswith("S002C003"):
            write_skeleton(tmp_path / "skel" / f"{n}.skeleton", [])
    (tmp_path / "rgb" / "README_rgb.avi").write_bytes(b"")  # not an NTU name: ignored
    samples = index_ntu(tmp_path)
    assert len(samples) == len(names)
    assert sum(s.skeleton is None for s in samples) == 4  # S002C003: no skeleton file
    hs = filter_samples(samples, action=58, setups=[1], cameras=[1, 2])
    assert [str(s.name) for s in hs] == ["S001C001P001R001A058", "S001C001P008R001A058",
                                         "S001C002P001R001A058", "S001C002P008R001A058"]
    assert filter_samples(samples, action=58, performers=[8], replications=[2]) == []
    all58 = filter_samples(samples, action=58)
    a, b, c = choose(all58, 5, seed=1), choose(all58, 5, seed=1), choose(all58, 5, seed=2)
    assert a == b and a != c and len(a) == 5 and a == sorted(a, key=lambda s: s.name)
    assert choose(all58, 100, seed=0) == all58
    with pytest.raises(FileNotFoundError, match="--ntu-root"):
        index_ntu(tmp_path / "missing")


def test_parser_reads_bodies_ids_and_colour_joints(tmp_path):
    path = write_skeleton(tmp_path / "a.skeleton", two_people_frames(3))
    seq = parse_skeleton(path)
    assert len(seq.frames) == 3 and [len(f) for f in seq.frames] == [2, 2, 2]
    body = seq.frames[0][1]
    assert body.body_id == 72057594037931691 and body.colour_xy.shape == (25, 2)
    np.testing.assert_allclose(body.colour_xy, standing_body(600.0), atol=1e-3)
    assert (body.tracking == 2).all()


def test_zero_one_and_three_bodies_and_joints_outside_the_frame(tmp_path):
    frames = [[], [(1, standing_body(500))], [(1, standing_body(500)), (2, standing_body(1400)),
                                               (3, standing_body(3000, y=-500))]]
    seq = parse_skeleton(write_skeleton(tmp_path / "odd.skeleton", frames))
    assert [len(f) for f in seq.frames] == [0, 1, 3]
    assert seq.frames[2][2].colour_xy[0, 0] == pytest.approx(3000)
    assert seq.body_ids() == [1, 2, 3]


def test_broken_files_are_skeleton_errors_naming_the_file(tmp_path):
    good = write_skeleton(tmp_path / "good.skeleton", two_people_frames(2)).read_text().splitlines()
    (tmp_path / "truncated.skeleton").write_text("\n".join(good[:40]))
    with pytest.raises(SkeletonError, match="truncated.skeleton: file ends early"):
        parse_skeleton(tmp_path / "truncated.skeleton")
    (tmp_path / "joints.skeleton").write_text("\n".join(good[:3] + ["24"] + good[4:]))
    with pytest.raises(SkeletonError, match="24 joints"):
        parse_skeleton(tmp_path / "joints.skeleton")
    (tmp_path / "text.skeleton").write_text("many\n")
    with pytest.raises(SkeletonError, match="frame count 'many'"):
        parse_skeleton(tmp_path / "text.skeleton")
    with pytest.raises(FileNotFoundError):
        parse_skeleton(tmp_path / "none.skeleton")
