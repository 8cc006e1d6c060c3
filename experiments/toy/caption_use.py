"""Does the toy base read its caption? Subject fidelity of clips the base finishes from rendered clips
noised to fixed levels, captioned right, with every shape word changed, with every colour word
changed, and with the empty caption.

A clip of resting subjects (a test pair, never seen together in pretraining) is rendered, encoded
and noised to level sigma; the base then samples on from sigma to 0 as relvid samples (Euler, CFG
against the empty caption), and the finished clip is judged twice:
- `shown`: against the subjects in the rendered clip, which the noisy start still shows at low noise;
- `asked`: against the subjects the caption names.

With the right caption both are the same. At low noise the start decides and every caption gives the
same `shown` figure. From noise level 1 the start shows nothing: that row is plain sampling, and a
base that reads its caption draws what it is asked for (`asked` of every caption near the right
caption's). A base that ignores a kind of word gives the same `shown` figures with that kind of word
changed as with the right caption, at every level. Every caption of a clip gets the same noise.

`--one-step` skips the sampler (about 40 times cheaper, for comparing base recipes): each noisy clip
gets one prediction of the clean clip, x0 = z_sigma + sigma * v, with the right caption and with
every caption that gives subject 1 another shape (or another colour). A base that reads a kind of
word predicts best with the right word: "lowest" is the share of clips where the right caption's
prediction has the smallest error (chance: one in the number of choices), "gap" how much larger the
other captions' errors are on average.

    python experiments/toy/caption_use.py                     # the committed base
    python experiments/toy/caption_use.py --base outputs/toy-base --clips 40 --sigmas 0.9,1
    python experiments/toy/caption_use.py --one-step --clips 40 --sigmas 0.5,0.8,0.9,0.95,0.99
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from relvid.inference.generate import to_uint8_frames
from relvid.inference.sampler import sample
from relvid.losses.flow_matching import model_timestep, noisy_latents
from relvid.seeding import derive_seed
from relvid.toy.codec import ToyCodec
from relvid.toy.drivers.base import BASE_DIR
from relvid.toy.drivers.customize import load_base
from relvid.toy.drivers.evaluate import TOY_SAMPLING, noise_levels
from relvid.toy.judge import judge
from relvid.toy.render import render_clip
from relvid.toy.text import ToyTextEncoder
from relvid.toy.world import COLOURS, EXEMPLAR_COLOUR, FRAMES, SHAPES, Subject, generic_caption, test_pairs

CAPTIONS = ("right", "shapes changed", "colours changed", "empty")
GUIDANCE = TOY_SAMPLING.guidance_scale  # as the toy world samples
_CLIP_STREAM, _NOISE_STREAM = 401, 402


def changed_shape(s: Subject) -> Subject:
    """The same colour, another shape (two steps along SHAPES, so a pair of distinct shapes stays distinct)."""
    return Subject(s.colour, SHAPES[(SHAPES.index(s.shape) + 2) % len(SHAPES)])


def changed_colour(s: Subject) -> Subject:
    """The same shape, another test colour (three steps along the non-exemplar colours)."""
    colours = [c for c in COLOURS if c != EXEMPLAR_COLOUR]
    return Subject(colours[(colours.index(s.colour) + 3) % len(colours)], s.shape)


def captioned_subjects(kind: str, a: Subject, b: Subject) -> tuple[Subject, Subject] | None:
    """The subjects a caption of this kind names (None: the empty caption names none)."""
    if kind == "right":
        return a, b
    if kind == "shapes changed":
        return changed_shape(a), changed_shape(b)
    if kind == "colours changed":
        return changed_colour(a), changed_colour(b)
    if kind == "empty":
        return None
    raise ValueError(f"unknown caption kind {kind!r}; kinds are {CAPTIONS}")


def finish(model: torch.nn.Module, z_sigma: torch.Tensor, sigma: float, embeds: torch.Tensor, mask: torch.Tensor,
           negative: tuple[torch.Tensor, torch.Tensor], steps: int, guidance: float = GUIDANCE) -> torch.Tensor:
    """relvid's sampler (Euler, CFG) from `sigma` to 0 in `steps` even steps: (1, C, f, h, w) clean latents."""
    return sample(model, z_sigma, embeds[None], mask[None], negative[0][None], negative[1][None],
                  guidance_scale=guidance, sigmas=torch.linspace(sigma, 0.0, steps + 1, dtype=torch.float64))


def _noisy_clip(i: int, seed: int, frames: int, codec: ToyCodec) -> tuple[Subject, Subject, torch.Tensor, torch.Tensor]:
    """Clip i: a test pair resting, its clean latents (1, C, f, h, w) and its noise (same shape)."""
    pairs = test_pairs()
    a, b = pairs[i % len(pairs)]
    clip = render_clip("static", a, b, derive_seed(seed, i, _CLIP_STREAM))
    z0, _ = codec.encode(clip.video[None, :, :frames])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(derive_seed(seed, i, _NOISE_STREAM)))
    return a, b, z0, noise


@torch.no_grad()
def caption_use(model: torch.nn.Module, sigmas: list[float], clips: int = 20, frames: int = FRAMES,
                steps: int = 12, seed: int = 0, progress: bool = True) -> dict:
    """{sigma: {caption kind: {"shown": fraction, "asked": fraction or None}}} over `clips` clips."""
    codec, text = ToyCodec(), ToyTextEncoder()
    negative = text.encode([""])[0]
    counts = {s: {k: {"shown": 0, "asked": 0} for k in CAPTIONS} for s in sigmas}
    for i in tqdm(range(clips), desc="caption use", disable=not progress):
        a, b, z0, noise = _noisy_clip(i, seed, frames, codec)
        named = {k: captioned_subjects(k, a, b) for k in CAPTIONS}
        encoded = text.encode(["" if n is None else generic_caption("static", *n) for n in named.values()])
        for s in sigmas:
            z_sigma = noisy_latents(z0, noise, torch.tensor([s]))
            for kind, (embeds, mask) in zip(CAPTIONS, encoded, strict=True):
                video = to_uint8_frames(codec.decode(finish(model, z_sigma, s, embeds, mask, negative, steps))[0])
                if video.shape[0] == 1:
                    video = video.expand(FRAMES, -1, -1, -1)  # a still: the judge looks at a clip
                counts[s][kind]["shown"] += judge(video, a, b).subjects_ok
                if named[kind] is not None:
                    counts[s][kind]["asked"] += judge(video, *named[kind]).subjects_ok
    return {s: {k: {"shown": c["shown"] / clips, "asked": None if k == "empty" else c["asked"] / clips}
                for k, c in by_kind.items()} for s, by_kind in counts.items()}


WORDS = ("shape", "colour")  # the kind of word --one-step varies in subject 1's name


def word_choices(word: str, a: Subject, b: Subject) -> list[Subject]:
    """Every subject 1 a caption of the pair could name with only its `word` changed; a comes first.
    Colours leave out the exemplar colour and b's colour, as test pairs do."""
    if word == "shape":
        return [a, *(Subject(a.colour, s) for s in SHAPES if s != a.shape)]
    if word == "colour":
        return [a, *(Subject(c, a.shape) for c in COLOURS if c not in (a.colour, b.colour, EXEMPLAR_COLOUR))]
    raise ValueError(f"unknown kind of word {word!r}; kinds are {WORDS}")


@torch.no_grad()
def one_step_reading(model: torch.nn.Module, sigmas: list[float], clips: int = 20, frames: int = FRAMES,
                     seed: int = 0, progress: bool = True) -> dict:
    """{sigma: {word: {"lowest", "gap", "chance"}}}: how often the right caption's one-step clean
    prediction has the smallest error among captions that change subject 1's word, and by how much
    (mean relative excess of the other captions' errors). The same clips and noise as caption_use."""
    codec, text = ToyCodec(), ToyTextEncoder()
    wins = {s: {w: 0 for w in WORDS} for s in sigmas}
    gaps = {s: {w: 0.0 for w in WORDS} for s in sigmas}
    chance = {w: 0.0 for w in WORDS}
    for i in tqdm(range(clips), desc="one-step caption use", disable=not progress):
        a, b, z0, noise = _noisy_clip(i, seed, frames, codec)
        encoded = {}
        for word in WORDS:
            choices = word_choices(word, a, b)
            chance[word] += 1 / len(choices) / clips
            encoded[word] = text.encode([generic_caption("static", s1, b) for s1 in choices])
        for s in sigmas:
            z_sigma = noisy_latents(z0, noise, torch.tensor([s]))
            for word in WORDS:
                errors = torch.stack([
                    (z_sigma + s * model(hidden_states=z_sigma, encoder_hidden_states=e[None],
                                         timestep=model_timestep(torch.tensor([s])), encoder_attention_mask=m[None],
                                         return_dict=False)[0].float() - z0).square().mean()
                    for e, m in encoded[word]])  # (choices,): error of x0 = z_sigma + sigma * v, v ~ z0 - noise
                wins[s][word] += int(bool((errors[1:] > errors[0]).all()))  # a tie is not a win
                gaps[s][word] += float(errors[1:].mean() / errors[0] - 1) / clips
    return {s: {w: {"lowest": wins[s][w] / clips, "gap": gaps[s][w], "chance": chance[w]} for w in WORDS}
            for s in sigmas}


def one_step_table(results: dict) -> str:
    head = "| sigma | " + " | ".join(f"{w} words: right lowest (chance) / gap" for w in WORDS) + " |"
    rows = [head, "|---:|" + "---:|" * len(WORDS)]
    for s, by_word in results.items():
        cells = [f"{c['lowest']:.2f} ({c['chance']:.2f}) / {100 * c['gap']:+.1f} %" for c in by_word.values()]
        rows.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def table(results: dict) -> str:
    head = "| sigma | " + " | ".join(f"{k}: shown / asked" for k in CAPTIONS) + " |"
    rows = [head, "|---:|" + "---:|" * len(CAPTIONS)]
    for s, by_kind in results.items():
        cells = [f"{c['shown']:.2f} / " + ("-" if c["asked"] is None else f"{c['asked']:.2f}")
                 for c in by_kind.values()]
        rows.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=BASE_DIR, help="base model folder (default: the committed base)")
    p.add_argument("--sigmas", type=noise_levels, default=[0.5, 0.8, 0.9, 0.95, 1.0],
                   help="comma-separated noise levels in [0, 1] (default: 0.5,0.8,0.9,0.95,1)")
    p.add_argument("--clips", type=int, default=20, help="clips per noise level (default: %(default)s)")
    p.add_argument("--frames", type=int, default=FRAMES, help="1: first frames only (stills); default: whole clips")
    p.add_argument("--steps", type=int, default=12, help="Euler steps from each level to 0 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--one-step", action="store_true",
                   help="one clean prediction per caption instead of sampling (about 40x cheaper; see above)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args()
    if args.clips < 1:
        p.error(f"--clips must be >= 1, got {args.clips}")
    if min(args.sigmas) <= 0:
        p.error(f"--sigmas: every level must be above 0 (a clip at level 0 is already finished), got {args.sigmas}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.frames not in (1, FRAMES):
        p.error(f"--frames must be 1 or {FRAMES}, got {args.frames}")
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"{args.base}: no config.json; pass a base model folder (relvid toy-base --out)")
    kind = "stills" if args.frames == 1 else "whole clips"
    if args.one_step:
        results = one_step_reading(load_base(args.base), args.sigmas, args.clips, args.frames, args.seed)
        print(f"{args.base}, {args.clips} {kind}: one-step clean predictions, the right caption against captions "
              f"that change subject 1's shape or colour word")
        print(one_step_table(results))
    else:
        results = caption_use(load_base(args.base), args.sigmas, args.clips, args.frames, args.steps, args.seed)
        print(f"{args.base}, {args.clips} {kind}: subject fidelity "
              f"of clips finished from each noise level in {args.steps} Euler steps, CFG {GUIDANCE:g}")
        print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"base": str(args.base), "mode": "one-step" if args.one_step else "sampled",
                                         "clips": args.clips, "frames": args.frames, "steps": args.steps,
                                         "seed": args.seed, "results": {f"{s:g}": r for s, r in results.items()}},
                                        indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
