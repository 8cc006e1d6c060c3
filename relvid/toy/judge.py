"""The toy world's judge: finds the two prompted subjects by colour, checks their shapes, and
classifies the relation from their tracks. Model-free, so every paper metric has an exact twin.

- Colour: each foreground pixel (far from the frame's background colour) takes the nearest toy
  colour, if near enough. A subject is present when its colour covers enough pixels in most frames.
- Colour fidelity (colours_ok): both prompted colours present and no exemplar-coloured shape.
- Shape: the subject's pixels in frames where the two are apart are matched (IoU) against each
  toy shape rendered over a small grid of centres and radii; the majority over frames wins.
- Relation: tracks of the two objects in the frame, whatever their colour (relation accuracy and
  subject fidelity are separate metrics, as RelAcc and CLIP-T are in the paper): the foreground
  pixels of each frame are split into two clusters (2-means, started from the previous frame's
  centres), gaps interpolated, lightly smoothed. Each relation is a rule on the two tracks, tried
  with both role assignments (the paper's judge asks whether the two subjects perform the
  interaction, not who leads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from relvid.toy.render import shape_mask
from relvid.toy.world import COLOURS, EXEMPLAR_COLOUR, RELATIONS, SHAPES, SIZE, Subject

FOREGROUND_DISTANCE = 0.3  # RGB distance (in [0, 1] units) from the background colour
COLOUR_DISTANCE = 0.38  # a foreground pixel takes the nearest toy colour within this distance
MIN_PIXELS = 4  # pixels of a colour for it to count as present in a frame
PRESENT_FRACTION = 0.7  # share of frames in which a subject must be present
LEAK_PIXELS = 6  # pixels of the exemplar colour for a frame to show an exemplar subject
LEAK_FRACTION = 0.3  # share of frames that must show it
MIN_SHAPE_IOU = 0.45
APART = 11.0  # centroid distance (px) above which a frame shows both subjects unoccluded


@dataclass
class Judgement:
    relation: str | None  # the classified relation, None for none (or subjects not found)
    present: tuple[bool, bool]  # each prompted colour found in most frames
    shapes: tuple[str | None, str | None]  # shape seen for each subject
    subjects_ok: bool  # both subjects present with the prompted colour and shape
    leakage: bool  # an exemplar-coloured subject appears although the prompt has none
    tracks: Tensor | None = field(default=None, repr=False)  # (2, T, 2) centroids (x, y)

    @property
    def colours_ok(self) -> bool:
        """Colour fidelity: both prompted colours present and no exemplar-coloured shape leaked in
        (shapes not asked: a looser bar than subjects_ok, which the base's blob shapes rarely pass)."""
        return all(self.present) and not self.leakage


def _palette() -> tuple[list[str], Tensor]:
    names = list(COLOURS)
    return names, torch.tensor([COLOURS[n] for n in names])  # (K, 3)


_PLUS = [1, 3, 4, 5, 7]  # the centre and its 4 neighbours in a flattened 3 x 3 patch


def median3(x: Tensor) -> Tensor:
    """Plus-shaped (centre + 4 neighbours) median filter over the last two dims of (N, H, W).

    It removes isolated noisy pixels but, unlike a 3 x 3 box, keeps a square's corners.
    """
    n, h, w = x.shape
    padded = torch.nn.functional.pad(x[:, None].float(), (1, 1, 1, 1), mode="replicate")  # (N, 1, H+2, W+2)
    patches = torch.nn.functional.unfold(padded, 3)[:, _PLUS]  # (N, 5, H*W)
    return patches.median(dim=1).values.reshape(n, h, w)


def colour_labels(frames: Tensor, with_foreground: bool = False):
    """(T, H, W, 3) in [0, 1] -> (T, H, W) long: index into COLOURS, or -1 for background/unknown.

    Frames are median-filtered (3 x 3) first: generated videos carry pixel noise that a viewer
    looks through, and a shape survives the filter (the templates are filtered the same way).
    """
    names, palette = _palette()
    t, h, w, _ = frames.shape
    frames = median3(frames.permute(0, 3, 1, 2).reshape(t * 3, h, w)).reshape(t, 3, h, w).permute(0, 2, 3, 1)
    t = frames.shape[0]
    background = frames.reshape(t, -1, 3).median(dim=1).values  # (T, 3): the dominant colour
    far = (frames - background[:, None, None]).norm(dim=-1) > FOREGROUND_DISTANCE  # (T, H, W)
    dist = (frames[..., None, :] - palette).norm(dim=-1)  # (T, H, W, K)
    best, index = dist.min(dim=-1)
    labels = torch.where(far & (best < COLOUR_DISTANCE), index, torch.full_like(index, -1))
    return (labels, far) if with_foreground else labels


@lru_cache(maxsize=1)
def _templates() -> tuple[Tensor, Tensor]:
    """Shape templates over centre offsets and radii, centred in the frame: (S, N, H, W) bool, (N, 2) offsets."""
    offsets = torch.linspace(-1.0, 1.0, 5)
    radii = torch.linspace(3.0, 5.7, 7)
    params = torch.cartesian_prod(offsets, offsets, radii)  # (N, 3)
    centre = (SIZE - 1) / 2
    out = []
    for shape in SHAPES:
        masks = [shape_mask(shape, torch.tensor([[centre + dx, centre + dy]]), float(r))[0] for dx, dy, r in params]
        out.append(median3(torch.stack(masks)) > 0.5)  # as the judged frames are filtered
    return torch.stack(out), params


def classify_shape(mask: Tensor) -> tuple[str | None, float]:
    """Best-matching shape of a (H, W) bool blob and its IoU; None below MIN_SHAPE_IOU."""
    if int(mask.sum()) < MIN_PIXELS:
        return None, 0.0
    ys, xs = torch.nonzero(mask, as_tuple=True)
    # Move the blob's bounding-box centre to the frame centre, where the templates sit.
    cy = (int(ys.min()) + int(ys.max())) / 2
    cx = (int(xs.min()) + int(xs.max())) / 2
    shift_y, shift_x = round((SIZE - 1) / 2 - cy), round((SIZE - 1) / 2 - cx)
    centred = torch.zeros_like(mask)
    ys2, xs2 = ys + shift_y, xs + shift_x
    keep = (ys2 >= 0) & (ys2 < SIZE) & (xs2 >= 0) & (xs2 < SIZE)
    centred[ys2[keep], xs2[keep]] = True
    templates, _ = _templates()  # (S, N, H, W)
    inter = (templates & centred).flatten(2).sum(-1).float()  # (S, N)
    union = (templates | centred).flatten(2).sum(-1).float()
    iou = (inter / union).amax(dim=1)  # (S,)
    best = int(iou.argmax())
    return (SHAPES[best] if float(iou[best]) >= MIN_SHAPE_IOU else None), float(iou[best])


def object_tracks(foreground: Tensor) -> tuple[Tensor, Tensor] | None:
    """Two object tracks (2, T, 2) from a (T, H, W) bool foreground, and the frames where both were
    seen; None when fewer than half the frames show anything."""
    t = foreground.shape[0]
    centres = torch.zeros(2, t, 2)
    seen = torch.zeros(t, dtype=torch.bool)
    previous: Tensor | None = None
    for i in range(t):
        ys, xs = torch.nonzero(foreground[i], as_tuple=True)
        if len(xs) < 2 * MIN_PIXELS:
            continue
        pts = torch.stack([xs, ys], dim=1).float()  # (N, 2) as (x, y)
        if previous is None:  # farthest-point start: the two ends of the foreground
            c1 = pts[(pts - pts.mean(0)).norm(dim=1).argmax()]
            c2 = pts[(pts - c1).norm(dim=1).argmax()]
            c = torch.stack([c1, c2])
        else:
            c = previous.clone()
        for _ in range(6):  # Lloyd iterations
            assign = (pts[:, None] - c[None]).norm(dim=2).argmin(dim=1)  # (N,)
            for k in range(2):
                if bool((assign == k).any()):
                    c[k] = pts[assign == k].mean(0)
        centres[:, i], seen[i], previous = c, True, c
    if float(seen.float().mean()) < 0.5:
        return None
    return torch.stack([_fill(seen, centres[0]), _fill(seen, centres[1])]), seen


def _centroids(mask: Tensor) -> Tensor:
    """Per-frame centroid (T, 2) as (x, y) of a (T, H, W) mask."""
    ys, xs = torch.meshgrid(torch.arange(mask.shape[1]), torch.arange(mask.shape[2]), indexing="ij")
    area = mask.flatten(1).sum(1).clamp(min=1).float()
    return torch.stack([(mask * xs).flatten(1).sum(1) / area, (mask * ys).flatten(1).sum(1) / area], dim=1)


def _fill(present: Tensor, track: Tensor) -> Tensor:
    """Interpolate a (T, 2) track over frames where present is False, then smooth it lightly."""
    t = track.shape[0]
    track = track.clone()
    idx = torch.nonzero(present).flatten()
    for i in range(t):  # nearest-neighbour linear interpolation over missing frames
        if present[i]:
            continue
        before, after = idx[idx < i], idx[idx > i]
        if len(before) and len(after):
            a, b = int(before[-1]), int(after[0])
            track[i] = track[a] + (track[b] - track[a]) * (i - a) / (b - a)
        else:
            track[i] = track[int(before[-1] if len(before) else after[0])]
    # Light smoothing (window 3, ends kept) removes pixel jitter of generated videos.
    smooth = track.clone()
    smooth[1:-1] = (track[:-2] + track[1:-1] + track[2:]) / 3
    return smooth


# --- relation rules on tracks a, b (T, 2): "a <relation> b" -----------------------------------------

def _extent(x: Tensor) -> float:
    return float((x - x[0]).norm(dim=1).max())


def _disp(x: Tensor, i: int = 0, j: int = -1) -> Tensor:
    return x[j] - x[i]


def _cos(u: Tensor, v: Tensor) -> float:
    return float(torch.dot(u, v) / (u.norm() * v.norm() + 1e-6))


def _orbiting(a: Tensor, b: Tensor) -> bool:
    rel = a - b
    angle = torch.atan2(rel[:, 1], rel[:, 0])
    step = torch.remainder(angle[1:] - angle[:-1] + math.pi, 2 * math.pi) - math.pi  # unwrapped steps
    path = float((a[1:] - a[:-1]).norm(dim=1).sum())
    return (_extent(b) <= 3.5 and abs(float(step.sum())) >= 1.5 * math.pi
            and float(rel.norm(dim=1).mean()) >= 6.0 and path >= 30.0)


def _approaching(a: Tensor, b: Tensor) -> bool:
    d = (a - b).norm(dim=1)
    d0, dt = float(d[:3].mean()), float(d[-3:].mean())
    return _extent(b) <= 3.0 and d0 >= 14.0 and dt <= 0.6 * d0 and float(_disp(a).norm()) >= 7.0


def _moving_apart(a: Tensor, b: Tensor) -> bool:
    return _approaching(a.flip(0), b.flip(0))


def _pushing(a: Tensor, b: Tensor) -> bool:
    mid = len(a) // 2
    a1, a2 = _disp(a, 0, mid), _disp(a, mid, -1)
    b1, b2 = _disp(b, 0, mid), _disp(b, mid, -1)
    return (float(a1.norm()) >= 5.0 and float(a2.norm()) <= 3.0 and float(b1.norm()) <= 3.0
            and float(b2.norm()) >= 6.0 and _cos(a1, b2) >= 0.7 and float((a[mid] - b[mid]).norm()) <= 12.0)


def _following(a: Tensor, b: Tensor) -> bool:
    da, db = _disp(a), _disp(b)
    d = (a - b).norm(dim=1)
    ahead = float(((b - a) * (db / (db.norm() + 1e-6))).sum(dim=1).mean())
    return (float(da.norm()) >= 8.0 and float(db.norm()) >= 8.0 and _cos(da, db) >= 0.85
            and float(d.std()) <= 2.5 and ahead > 4.0)


def _swapping(a: Tensor, b: Tensor) -> bool:
    d0 = float((a[0] - b[0]).norm())
    return d0 >= 10.0 and float((a[-1] - b[0]).norm()) <= 4.5 and float((b[-1] - a[0]).norm()) <= 4.5


def _bouncing(a: Tensor, b: Tensor) -> bool:
    d = (a - b).norm(dim=1)
    d0 = float(d[0])
    tmin = int(d.argmin())
    return (d0 >= 14.0 and float(d.min()) <= 0.55 * d0 and len(a) // 4 <= tmin <= 3 * len(a) // 4
            and float(_disp(a).norm()) <= 4.0 and float(_disp(b).norm()) <= 4.0
            and _extent(a) >= 4.5 and _extent(b) >= 4.5)


RULES = {
    "orbiting": _orbiting,
    "approaching": _approaching,
    "moving_apart": _moving_apart,
    "pushing": _pushing,
    "following": _following,
    "swapping": _swapping,
    "bouncing": _bouncing,
}
assert set(RULES) == set(RELATIONS)


def classify_relation(tracks: Tensor) -> str | None:
    """The first relation whose rule holds for (track 1, track 2) in either role order, else None."""
    a, b = tracks[0], tracks[1]
    for name, rule in RULES.items():
        if rule(a, b) or rule(b, a):
            return name
    return None


def to_unit_frames(video: Tensor) -> Tensor:
    """uint8 (T, H, W, 3) or float (3, T, H, W) in [-1, 1] -> float (T, H, W, 3) in [0, 1]."""
    if video.dtype == torch.uint8:
        return video.float() / 255.0
    if video.dim() == 4 and video.shape[0] == 3:
        return ((video.float() + 1) / 2).permute(1, 2, 3, 0).clamp(0, 1)
    raise ValueError("judge: expected uint8 (T, H, W, 3) or float (3, T, H, W), "
                     f"got {video.dtype} {tuple(video.shape)}")


def judge(video: Tensor, s1: Subject, s2: Subject) -> Judgement:
    """Judge one clip against the prompted subjects (which must have different colours)."""
    # Tensors here are tiny: fanning them out over threads costs more than it gains, and on a busy
    # machine it costs a lot. One thread, restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _judge(video, s1, s2)
    finally:
        torch.set_num_threads(threads)


def _judge(video: Tensor, s1: Subject, s2: Subject) -> Judgement:
    if s1.colour == s2.colour:
        raise ValueError(f"judge: subjects {s1} and {s2} share a colour; the judge tells subjects apart by colour")
    frames = to_unit_frames(video)
    labels, labels_fg = colour_labels(frames, with_foreground=True)  # (T, H, W) each
    names = list(COLOURS)
    masks = [labels == names.index(s.colour) for s in (s1, s2)]  # 2 x (T, H, W)
    counts = [m.flatten(1).sum(1) for m in masks]
    present_frames = [c >= MIN_PIXELS for c in counts]
    present = tuple(bool(p.float().mean() >= PRESENT_FRACTION) for p in present_frames)
    exemplar = labels == names.index(EXEMPLAR_COLOUR)
    leak = EXEMPLAR_COLOUR not in (s1.colour, s2.colour) and bool(
        (exemplar.flatten(1).sum(1) >= LEAK_PIXELS).float().mean() >= LEAK_FRACTION)
    objects = object_tracks(labels_fg)
    relation = None
    if objects is not None and float((objects[0][0] - objects[0][1]).norm(dim=1).max()) >= 7.0:
        relation = classify_relation(objects[0])  # two separate objects at least once
    tracks = None if objects is None else objects[0]
    if not all(present):
        return Judgement(relation, present, (None, None), False, leak, tracks)
    centres = [_centroids(m) for m in masks]  # (T, 2) each
    apart = ((centres[0] - centres[1]).norm(dim=1) >= APART) & present_frames[0] & present_frames[1]
    frames_for_shape = torch.nonzero(apart).flatten().tolist() or torch.nonzero(
        present_frames[0] & present_frames[1]).flatten().tolist()
    frames_for_shape = frames_for_shape[:: max(1, len(frames_for_shape) // 4)]  # at most ~4 frames
    shapes = []
    for m in masks:
        votes: dict[str | None, int] = {}
        for i in frames_for_shape:
            shape, _ = classify_shape(m[i])
            votes[shape] = votes.get(shape, 0) + 1
        shapes.append(max(votes, key=votes.get) if votes else None)
    ok = shapes[0] == s1.shape and shapes[1] == s2.shape
    return Judgement(relation, present, (shapes[0], shapes[1]), ok, leak, tracks)
