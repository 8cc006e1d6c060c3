"""Clip windows: a start frame or time, the window where the two subjects are closest, several windows per
video, the captions CSV's start columns, and reruns with other window settings."""

import json

import numpy as np
import pytest
from PIL import Image

from relvid.cli import main
from relvid.data.cache import ClipCache
from relvid.errors import InputError
from relvid.preprocess.sources import Source, read_csv_starts
from relvid.preprocess.video import ClipSkipped, ClipSpec, load_clip
from relvid.preprocess.windows import WindowPlanner, WindowSettings, closest_starts
from tests.helpers.preprocess import standing_body, write_skeleton, write_video

SPEC = ClipSpec(frames=13, height=48, width=80)
SIZE = ["--frames", "13", "--height", "64", "--width", "112"]


def index_video(path, frames: int, fps: float = 30.0):
    """A 64x112 video whose frame i is flat grey 4 * i (i < 64), so that a decoded frame names its index."""
    levels = (np.arange(frames) * 4).astype(np.uint8)
    return write_video(path, np.broadcast_to(levels[:, None, None, None], (frames, 64, 112, 3)).copy(), fps=fps)


def indices(clip) -> list[int]:
    return [int(v) for v in np.round(clip.frames[:, 24, 40, 0] / 4)]


def clip_of(source: Source, settings: WindowSettings, k: int = 0):
    window = WindowPlanner(source, settings, SPEC).window(k)
    return load_clip(source.video, SPEC, window.start)


def test_start_frame_and_start_time_land_on_exactly_those_frames(tmp_path):
    video = Source("v", index_video(tmp_path / "v.mp4", 32), "x")
    assert indices(clip_of(video, WindowSettings())) == list(range(13))  # the default: the first frames
    assert indices(clip_of(video, WindowSettings(start_frame=10))) == list(range(10, 23))
    assert indices(clip_of(video, WindowSettings(start_time=0.5))) == list(range(15, 28))  # 0.5 s at 30 fps
    # 60 fps source: 0.25 s is source frame 15, and the clip takes every other frame from there at 30 fps
    fast = Source("f", index_video(tmp_path / "f.mp4", 60, fps=60), "x")
    assert indices(clip_of(fast, WindowSettings(start_time=0.25))) == list(range(15, 40, 2))
    # a source's own start (the captions CSV) wins over the run's
    own = Source("v", video.video, "x", start_frame=3)
    assert indices(clip_of(own, WindowSettings(start_time=0.5))) == list(range(3, 16))


def test_a_start_past_the_end_is_an_error_naming_the_file(tmp_path):
    video = index_video(tmp_path / "late.mp4", 32)
    with pytest.raises(ClipSkipped, match=r"late\.mp4: the start frame 40, from --start.*past the video's end "
                                          r"\(32 frames, 1\.07 s\)"):
        WindowPlanner(Source("late", video, "x"), WindowSettings(start_frame=40), SPEC).window(0)
    with pytest.raises(ClipSkipped, match=r"late\.mp4.*1.5 s \(frame 45 at 30 fps\), from its row of the captions"):
        WindowPlanner(Source("late", video, "x", start_time=1.5), WindowSettings(), SPEC).window(0)
    with pytest.raises(ClipSkipped, match=r"late\.mp4: the clip starts at frame 40 \(1\.33 s\), past the video's end"):
        load_clip(video, SPEC, 40)
    with pytest.raises(ClipSkipped, match="too short: 32 frames .* from frame 25"):  # starts inside, ends outside
        load_clip(video, SPEC, 25)


def approaching(frames: int, nearest: int) -> list:
    """Two NTU bodies that walk towards each other until frame ``nearest`` and apart again: their spine bases
    are 60 + 40 |f - nearest| px apart."""
    steps = [nearest - abs(f - nearest) for f in range(frames)]
    return [[(2, standing_body(1300 - 20 * n)), (1, standing_body(600 + 20 * n))] for n in steps]


def test_closest_window_from_skeletons_is_centred_on_the_nearest_frames(tmp_path):
    """The bodies' distance grows with |f - 16|: the mean over a 13-frame window is smallest for frames 10..22,
    centred on frame 16."""
    video = index_video(tmp_path / "S001C001P001R001A058_rgb.avi", 32)
    skeleton = write_skeleton(tmp_path / "S001C001P001R001A058.skeleton", approaching(32, 16))
    source = Source("S001C001P001R001A058", video, "x", skeleton=skeleton)
    window = WindowPlanner(source, WindowSettings(mode="closest"), SPEC).window(0)
    assert window.start == 10 and window.how == "closest"
    assert indices(load_clip(video, SPEC, window.start)) == list(range(10, 23))
    # a start is the earliest frame searched
    assert WindowPlanner(source, WindowSettings(mode="closest", start_frame=14), SPEC).window(0).start == 14
    # 32 frames hold no second window beside 10..22; 48 hold 23..35, the best one that does not overlap it
    with pytest.raises(ClipSkipped, match="window 2 of 2: only 1 non-overlapping window"):
        WindowPlanner(source, WindowSettings(mode="closest", count=2), SPEC).window(1)
    longer = Source("S001C001P001R001A058", index_video(tmp_path / "long_rgb.avi", 48), "x",
                    skeleton=write_skeleton(tmp_path / "long.skeleton", approaching(48, 16)))
    planner = WindowPlanner(longer, WindowSettings(mode="closest", count=2), SPEC)
    assert [planner.window(0).start, planner.window(1).start] == [10, 23]
    assert indices(load_clip(longer.video, SPEC, planner.window(1).start)) == list(range(23, 36))


def test_closest_window_from_mask_files(tmp_path):
    """Red and blue squares whose centres are 20 + 4 |f - 20| px apart: the window is frames 14..26."""
    video = index_video(tmp_path / "walk.mp4", 32)
    folder = tmp_path / "masks" / "walk"
    folder.mkdir(parents=True)
    for f in range(32):
        m = np.zeros((64, 112, 3), np.uint8)
        gap = 10 + 2 * abs(f - 20)
        m[28:36, 56 - gap - 4: 56 - gap + 4] = (255, 0, 0)
        m[28:36, 56 + gap - 4: 56 + gap + 4] = (0, 0, 255)
        Image.fromarray(m).save(folder / f"mask{f}.png")
    source = Source("walk", video, "x", masks=folder)
    window = WindowPlanner(source, WindowSettings(mode="closest"), SPEC).window(0)
    assert window.start == 14 and window.distance == pytest.approx(20 + 4 * 42 / 13, abs=0.5)
    assert indices(load_clip(video, SPEC, window.start)) == list(range(14, 27))
    with pytest.raises(ClipSkipped, match="needs where the subjects are"):
        WindowPlanner(Source("walk", video, "x"), WindowSettings(mode="closest"), SPEC).window(0)


def test_closest_needs_both_subjects_in_half_the_frames_and_ties_go_early():
    d = np.full(20, np.nan)
    d[:6] = 1.0  # very close, but only in 6 frames: too few for a 13-frame window in most places
    d[6:] = 5.0
    assert closest_starts(d, list(range(13)), 20, 0, 1) == [(0, pytest.approx((6 + 5 * 7) / 13))]
    d[:6] = np.nan  # present in frames 6..19: windows 0..7 all qualify at 5.0; the earliest wins
    assert closest_starts(d, list(range(13)), 20, 0, 1) == [(0, 5.0)]
    assert closest_starts(np.full(20, np.nan), list(range(13)), 20, 0, 1) == []


def test_csv_start_columns(tmp_path):
    csv = tmp_path / "caps.csv"
    csv.write_text("video,caption,start_frame,start_time\na.mp4,A.,75,\nb,B.,,2.5s\nc.mp4,C.,,\n")
    assert read_csv_starts(csv) == {"a.mp4": (75, None), "b": (None, 2.5)}
    csv.write_text("video,caption,start_frame,start_time\na.mp4,A.,75,2.5\n")
    with pytest.raises(InputError, match=r"caps\.csv: line 2 \(a\.mp4\): fill one of start_frame and start_time"):
        read_csv_starts(csv)
    csv.write_text("video,caption,start_time\na.mp4,A.,soon\n")
    with pytest.raises(InputError, match=r"caps\.csv: line 2 \(a\.mp4\).*got 'soon'"):
        read_csv_starts(csv)
    with pytest.raises(InputError, match="not both"):
        WindowSettings(start_frame=1, start_time=1.0)
    with pytest.raises(InputError, match="preprocess.window="):
        WindowSettings(mode="nearest")


def test_several_windows_and_csv_starts_become_clips_with_their_windows_and_reruns_keep_them(mochi, tmp_path,
                                                                                            capsys):
    videos, masks = tmp_path / "videos", tmp_path / "masks"
    for stem in ("long", "late"):
        index_video(videos / f"{stem}.mp4", 32)
        (masks / stem).mkdir(parents=True)
        for f in range(32):
            m = np.zeros((64, 112, 3), np.uint8)
            m[8:56, 8:40], m[8:56, 60:100] = (255, 0, 0), (0, 0, 255)
            Image.fromarray(m).save(masks / stem / f"m{f}.png")
    csv = tmp_path / "caps.csv"
    csv.write_text("video,caption,start_time\nlong.mp4,Two people walk.,\nlate.mp4,Two people meet.,0.5\n")
    out = tmp_path / "cache"
    args = ["preprocess", "-r", "meeting", "--videos", str(videos), "--captions-csv", str(csv), "--mask-source",
            "files", "--masks", str(masks), "--mochi-path", str(mochi), "--out", str(out), "--device", "cpu",
            "--no-progress", *SIZE]
    assert main(args + ["--windows", "2"]) == 0
    cache = ClipCache(out)
    assert cache.clip_ids() == ["late_w1", "long_w1", "long_w2"]
    meta = {cid: cache.read(cid).meta for cid in cache.clip_ids()}
    assert {cid: (m["frame_range"], m["window"]) for cid, m in meta.items()} == {
        "long_w1": ("0-12", "first,windows=2"), "long_w2": ("13-25", "first,windows=2"),
        "late_w1": ("15-27", "start_time=0.5s,windows=2")}
    windows = {c["id"]: c["window"] for c in cache.manifest["clips"]}  # the manifest records each window
    assert windows["late_w1"] == {"start": 15, "end": 27, "how": "start_time=0.5s,windows=2"}
    assert windows["long_w2"] == {"start": 13, "end": 25, "how": "first,windows=2"}
    # the second window of "late" (frames 28..40) does not fit its 32 frames: a failure that says which clip
    failure = json.loads((out / "manifest.json").read_text())["failures"]
    assert len(failure) == 1 and "late_w2: late.mp4: window 2 of 2 ends past the video's end" in failure[0]["reason"]
    assert cache.manifest["config"]["window"] == {"mode": "start", "start_frame": None, "start_time": None,
                                                  "count": 2, "stride": None}
    capsys.readouterr()

    # the same settings again: nothing to do
    assert main(args + ["--windows", "2"]) == 0
    assert "0 clips written, 3 already cached, 1 failed" in capsys.readouterr().out
    # other window settings are refused, like another clip size
    assert main(args + ["--windows", "3"]) == 2
    assert "field 'config.window'" in capsys.readouterr().err
    assert main(args) == 2
    assert "windows=2, this run asks for windows=1" in capsys.readouterr().err
    # a changed start in the CSV is refused for the clip it concerns, naming what to delete
    csv.write_text("video,caption,start_time\nlong.mp4,Two people walk.,\nlate.mp4,Two people meet.,0.4\n")
    assert main(args + ["--windows", "2"]) == 2
    err = capsys.readouterr().err
    assert "late_w1.safetensors: field 'meta.window'" in err and "'start_time=0.4s,windows=2'" in err
    assert cache.clip_ids() == ClipCache(out).clip_ids()  # nothing written by the refused runs
