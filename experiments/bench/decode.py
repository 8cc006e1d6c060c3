"""Decoding speed and frame-index exactness of the video decoders relvid can use: PyAV, torchcodec, decord.

Writes test videos at 480x848 whose frames carry their own index (a row of black and white bars: the
index in binary, which survives lossy coding), then, per decoder and video, reads a 61-frame clip
starting at frame 0 and at a frame in the middle (a seek), as `relvid preprocess` does: open the file,
read the clip's frames, close. Each decoder runs through relvid's own reader
(relvid.preprocess.video.DECODERS), one decoding thread each. Prints a table: median milliseconds per
clip over --repeats (wall and CPU time), clip frames per second, and whether every frame read is the one asked for.

    python experiments/bench/decode.py                 # 120-frame videos, 3 repeats
    python experiments/bench/decode.py --frames 300 --start 150 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from relvid.preprocess.video import DECODERS, ClipSpec, source_indices

BITS = 10  # up to 1024 frames
HEIGHT, WIDTH = 480, 848


def index_frames(count: int, seed: int = 0) -> np.ndarray:
    """(count, 480, 848, 3) frames: the top 96 rows hold the frame index in binary bars, the rest moving
    texture (so that decoding costs what a real video costs, not what a flat frame does)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (HEIGHT + count * 2, WIDTH, 3), dtype=np.uint8)
    texture = (texture // 2 + 64).astype(np.uint8)
    frames = np.empty((count, HEIGHT, WIDTH, 3), dtype=np.uint8)
    bar = WIDTH // BITS
    for i in range(count):
        frames[i] = texture[2 * i: 2 * i + HEIGHT]
        for b in range(BITS):
            frames[i, :96, b * bar: (b + 1) * bar] = 255 if (i >> b) & 1 else 0
    return frames


def read_index(frame: np.ndarray) -> int:
    """The index written by index_frames, read back from the centre of each bar."""
    bar = frame.shape[1] // BITS
    return sum(1 << b for b in range(BITS) if frame[48, b * bar + bar // 2].mean() > 127)


def write(path: Path, frames: np.ndarray, codec: str, gop: int, bframes: int, fps: int = 30) -> Path:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width, stream.pix_fmt = HEIGHT, WIDTH, "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"crf": "20", "preset": "veryfast", "bf": str(bframes)}
        else:
            stream.codec_context.max_b_frames = bframes
            stream.codec_context.bit_rate = 8_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


VIDEOS = (  # name, suffix, codec, keyframe interval, B-frames
    ("H.264 mp4, keyframe every 30, B-frames", ".mp4", "libx264", 30, 3),
    ("H.264 mp4, one keyframe (ultrafast-like)", ".mp4", "libx264", 1000, 0),
    ("MPEG-4 Part 2 avi, keyframe every 12", ".avi", "mpeg4", 12, 0),
    ("H.264 avi, keyframe every 30 (timestamps start at 1)", ".avi", "libx264", 30, 0),
)


def available() -> dict[str, str | None]:
    """Decoder name -> None when it works here, else why not."""
    from relvid.preprocess.video import _Unreadable

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "probe.mp4", index_frames(8), "libx264", 30, 0)
        for name, reader in DECODERS.items():
            try:
                reader(path).read([0])
                out[name] = None
            except _Unreadable as err:
                out[name] = str(err)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=120, help="frames per test video")
    parser.add_argument("--start", type=int, default=None, help="the mid-video start frame (default: frames // 2 - 25)")
    parser.add_argument("--clip", type=int, default=61, help="clip frames (6k+1)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = ClipSpec(frames=args.clip)
    mid = args.start if args.start is not None else max(1, args.frames // 2 - 25)
    usable = available()
    for name, why in usable.items():
        if why:
            print(f"# {name} not measured: {why}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        frames = index_frames(args.frames)
        for label, suffix, codec, gop, bframes in VIDEOS:
            path = write(Path(tmp) / f"{codec}_{gop}_{bframes}{suffix}", frames, codec, gop, bframes)
            for start in (0, mid):
                wanted = [start + i for i in source_indices(spec.frames, 30.0, spec.fps)]
                if wanted[-1] >= args.frames:
                    raise SystemExit(f"--start {start}: a {args.clip}-frame clip does not fit {args.frames} frames")
                names = [n for n in DECODERS if not usable[n]]
                times: dict[str, list[float]] = {n: [] for n in names}
                cpu: dict[str, list[float]] = {n: [] for n in names}
                exact = dict.fromkeys(names, True)
                for n in names:  # warm-up: file cache, libraries loaded
                    DECODERS[n](path).read(wanted)
                for _ in range(args.repeats):  # decoders interleaved, so that load on the machine hits all alike
                    for n in names:
                        t0, c0 = time.perf_counter(), time.process_time()
                        got = DECODERS[n](path).read(wanted)
                        times[n].append(time.perf_counter() - t0)
                        cpu[n].append(time.process_time() - c0)
                        exact[n] &= [read_index(f) for f in got] == wanted and got.shape[1:] == (HEIGHT, WIDTH, 3)
                for n in names:
                    ms, cpu_ms = statistics.median(times[n]) * 1000, statistics.median(cpu[n]) * 1000
                    rows.append((label, start, n, ms, cpu_ms, len(wanted) / (ms / 1000), exact[n]))
    print(f"\n{args.frames}-frame {WIDTH}x{HEIGHT} 30 fps videos, {args.clip}-frame clips, one decoding thread, "
          f"median of {args.repeats}\n")
    print("| video | clip start | decoder | ms per clip (wall) | ms per clip (CPU) | clip frames/s | exact indices |")
    print("|---|---|---|---|---|---|---|")
    for label, start, name, ms, cpu_ms, fps, exact in rows:
        print(f"| {label} | {start} | {name} | {ms:.0f} | {cpu_ms:.0f} | {fps:.0f} | {'yes' if exact else 'NO'} |")


if __name__ == "__main__":
    main()
