"""`vlmkit data synth-highres`: a built-in task that only a high-resolution view can answer.

Each image (256 x 256 by default) shows one to three small objects (14-20 px across) in
different colours over large pale-grey clutter, each filled with a fine two-tone pattern --
horizontal, vertical or diagonal stripes or checks, repeating every 5 px -- and asks
"What pattern does the red object have?". The colour that names the object survives any
downscaling; the pattern does not: squeezed into a 64 x 64 view, a 5 px period is finer than
that view can hold (its limit is an 8 px period) and blurs into the same flat tint, while a
2x2, 3x3 or 4x4 slicing shows it with 2.5 to 5 pixels per period. So the gap between a model
with and without image slicing measures what slicing buys; tests/data/test_synth_highres.py
checks the claim with a pixel classifier.

Small silhouettes would not do: a 10 px circle, square, triangle and cross squeezed to 2-3 px
still differ enough for a pixel classifier to tell them apart 70 % of the time.

What keeps the task honest:
- every pattern covers half the object, so all four blur to the same colour;
- objects never cross a slice boundary of the 2x2, 3x3 or 4x4 grids (`SLICE_GRIDS`), so each
  is whole in one crop; they never overlap each other;
- answers are balanced (record i asks about pattern i mod 4): the majority baseline is 25 %;
- colours, outlines and the other objects' patterns are drawn independently of the answer.

Same layout as `vlmkit data synth`: `out/{split}.jsonl`, `out/images/{split}/*.png`, `out/info.json`.
Record i of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlmkit.data.scenes import COLOURS, SHAPES, _draw_shape, _jitter
from vlmkit.data.workers import worker_pool
from vlmkit.errors import ConfigError
from vlmkit.files import write_text_atomic

# Lengths are in pixels of a 256 px image and scale with `image_size`, so the claim holds at any size.
# Every pattern repeats every PERIOD pixels along each axis it varies on. Bicubic downscaling by 4
# keeps 3 % of a 5 px period's contrast, by 2 keeps 70 % (by 4/3, 90 %): gone in a 64 px view of
# 256, plain in any slice. A 6 px period would keep 15 % at 64 px, enough for a pixel classifier.
PERIOD = 5.0
RIM = 1.5  # solid colour around the pattern
OBJECT_SIZE = (14.0, 20.0)  # diameter range
_PATTERNS = {  # (u, v) in half-periods from an arbitrary origin -> is this pixel in the object's colour?
    "horizontal": lambda u, v: np.floor(v) % 2 == 0,
    "vertical": lambda u, v: np.floor(u) % 2 == 0,
    "diagonal": lambda u, v: np.floor(u + v) % 2 == 0,
    "checked": lambda u, v: (np.floor(u) + np.floor(v)) % 2 == 0,
}
PATTERNS = tuple(_PATTERNS)
SLICE_GRIDS = (2, 3, 4)
SUPERSAMPLE = 2  # enough for clean 2.5 px stripes, and 4x cheaper than scenes' 4
QUESTIONS = ("What pattern does the {colour} object have?", "Which pattern is on the {colour} object?",
             "How is the {colour} object patterned?")
DEFAULT_SIZES = {"train": 8000, "val": 200, "test": 800}


@dataclass(frozen=True)
class SmallObj:
    pattern: str
    shape: str  # the outline, a nuisance the answer does not depend on
    colour: str
    cx: float  # centre, in pixels of the final image
    cy: float
    diameter: float


@dataclass
class HighresScene:
    objects: list[SmallObj]  # the first is the one asked about
    image_size: int
    seed: int  # drives clutter and colour jitter


def _allowed(image_size: int, half: float, grids=SLICE_GRIDS) -> list[tuple[float, float]]:
    """Intervals of centre coordinates that keep an object of half-extent `half` inside one slice of every grid."""
    cuts = sorted({0.0, float(image_size)} | {image_size * k / g for g in grids for k in range(1, g)})
    margin = half + 2  # 2 px of background between the object and any cut or edge
    return [(a + margin, b - margin) for a, b in itertools.pairwise(cuts) if b - a > 2 * margin]


def _place(rng: random.Random, image_size: int, diameter: float, taken: list[SmallObj]) -> tuple[float, float]:
    intervals = _allowed(image_size, diameter / 2)
    if not intervals:
        raise ValueError(f"image_size {image_size} leaves no room for {diameter:.0f} px objects between slice cuts")
    for _ in range(1000):
        cx, cy = (rng.uniform(*rng.choice(intervals)) for _ in range(2))
        if all(math.hypot(cx - o.cx, cy - o.cy) > (diameter + o.diameter) / 2 + 4 for o in taken):
            return cx, cy
    raise ValueError("could not place the objects apart; lower max_objects or raise image_size")


def make_scene(rng: random.Random, answer: str, image_size: int = 256, max_objects: int = 3,
               object_size: tuple[float, float] = OBJECT_SIZE) -> HighresScene:
    """A scene whose first object has pattern `answer`; the others (up to `max_objects` in all) differ in colour.

    `object_size` is the diameter range in pixels of a 256 px image; larger objects carry more
    stripes, so a model trained from scratch learns the patterns sooner.
    """
    objects: list[SmallObj] = []
    for i, colour in enumerate(rng.sample(sorted(COLOURS), rng.randint(1, max_objects))):
        pattern = answer if i == 0 else rng.choice(PATTERNS)
        diameter = rng.uniform(*object_size) * image_size / 256
        cx, cy = _place(rng, image_size, diameter, objects)
        objects.append(SmallObj(pattern, rng.choice(SHAPES), colour, cx, cy, diameter))
    return HighresScene(objects, image_size, rng.randrange(2**31))


def _draw_object(image: Image.Image, obj: SmallObj, scale: float, colour, light, phase: tuple[float, float]) -> None:
    ss, half_period = SUPERSAMPLE, PERIOD / 2 * scale
    n = int(obj.diameter * ss) + 4
    x0, y0 = round(obj.cx * ss - n / 2), round(obj.cy * ss - n / 2)
    mask, inner = Image.new("L", (n, n), 0), Image.new("L", (n, n), 0)
    for layer, r in ((mask, obj.diameter / 2), (inner, obj.diameter / 2 - RIM * scale)):
        _draw_shape(ImageDraw.Draw(layer), obj.shape, obj.cx * ss - x0, obj.cy * ss - y0, r * ss, 255)
    rows, cols = np.mgrid[0:n, 0:n]
    # A random phase: anchored at the centre, stripes would shift the blob's centre of mass
    # along their normal, a cue that survives downscaling.
    u = ((cols + x0 + 0.5) / ss - obj.cx) / half_period + phase[0]
    v = ((rows + y0 + 0.5) / ss - obj.cy) / half_period + phase[1]
    # A solid rim: without it, stripes cut the outline along their normal only, and the blurred
    # blob of horizontal stripes would look wider than tall.
    on = _PATTERNS[obj.pattern](u, v) | (np.asarray(inner) == 0)
    fill = np.where(on[..., None], np.array(colour, np.uint8), np.array(light, np.uint8))
    image.paste(Image.fromarray(fill.astype(np.uint8)), (x0, y0), mask)


def render(scene: HighresScene, clutter: int = 4) -> Image.Image:
    """Draw the scene: `clutter` large pale-grey shapes, then the small patterned objects on top."""
    rng = random.Random(scene.seed)
    big = scene.image_size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), _jitter(rng, (238, 238, 238), 8))
    draw = ImageDraw.Draw(image)
    for _ in range(clutter):  # grey only, so no colour but the objects' own appears
        grey = rng.randint(205, 230)
        r = rng.uniform(0.08, 0.2) * big
        _draw_shape(draw, rng.choice(SHAPES), rng.uniform(0, big), rng.uniform(0, big), r, (grey,) * 3)
    for obj in scene.objects:
        phase = (rng.uniform(0, 2), rng.uniform(0, 2))  # in half-periods
        _draw_object(image, obj, scene.image_size / 256, _jitter(rng, COLOURS[obj.colour], 12),
                     _jitter(rng, (252, 252, 252), 3), phase)
    return image.resize((scene.image_size, scene.image_size), Image.LANCZOS)


def make_record(seed: int, split: str, index: int, image_size: int = 256, max_objects: int = 3,
                object_size: tuple[float, float] = OBJECT_SIZE) -> tuple[dict, HighresScene]:
    """Record `index` of `split`, a pure function of its arguments."""
    rng = random.Random(f"highres-{seed}-{split}-{index}")
    scene = make_scene(rng, PATTERNS[index % len(PATTERNS)], image_size, max_objects, object_size)
    question = rng.choice(QUESTIONS).format(colour=scene.objects[0].colour)
    record = {"id": f"{split}-{index:06d}", "images": [f"images/{split}/{index:06d}-0.png"],
              "conversations": [{"role": "user", "content": "<image>\n" + question},
                                {"role": "assistant", "content": scene.objects[0].pattern}],
              "category": "pattern"}
    return record, scene


def _write_chunk(args) -> list[dict]:
    out_dir, seed, split, start, stop, image_size, max_objects, object_size = args
    records = []
    for index in range(start, stop):
        record, scene = make_record(seed, split, index, image_size, max_objects, object_size)
        render(scene).save(out_dir / record["images"][0])
        records.append(record)
    return records


def synth_highres(out_dir: Path, seed: int = 0, sizes: dict | None = None, image_size: int = 256,
                  workers: int | None = None, max_objects: int = 3,
                  object_size: tuple[float, float] = OBJECT_SIZE) -> dict[str, Path]:
    """Write every split (train, val, test by default); returns split name -> JSONL path.

    `max_objects=1` leaves one object per scene: the question then needs no colour-to-object
    binding, only the resolution to see the pattern.
    """
    if max_objects < 1:
        raise ConfigError(f"max_objects must be at least 1, not {max_objects}")
    if not 4 <= object_size[0] <= object_size[1] <= 48:
        raise ConfigError(f"object_size {object_size} must be a (min, max) range within 4 to 48 px (of 256)")
    if image_size < 128:
        raise ConfigError(f"image_size {image_size} is too small for the high-resolution task; use 128 or more "
                          "(256, the default, is four times the 64 px view)")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    out_dir = Path(out_dir)
    paths = {}
    for split, n in sizes.items():
        if n <= 0:
            continue
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs = [(out_dir, seed, split, s, min(s + 256, n), image_size, max_objects, tuple(object_size))
                for s in range(0, n, 256)]
        n_workers = min(len(jobs), workers or os.cpu_count() or 1)
        path, tmp = out_dir / f"{split}.jsonl", out_dir / f"{split}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as handle:
            if n_workers > 1:
                with worker_pool(n_workers) as pool:
                    chunks = list(pool.map(_write_chunk, jobs))
            else:
                chunks = map(_write_chunk, jobs)
            for records in chunks:
                handle.writelines(json.dumps(r) + "\n" for r in records)
        tmp.replace(path)
        paths[split] = path
    # Record i asks about pattern i mod 4, so the most common answer is ceil(n / 4) of n.
    baseline = {split: math.ceil(n / len(PATTERNS)) / n for split, n in sizes.items() if n > 0}
    info = {"task": "highres", "seed": seed, "image_size": image_size, "max_objects": max_objects,
            "object_size": list(object_size),
            "sizes": sizes, "answers": PATTERNS,
            "slice_grids": SLICE_GRIDS, "majority_baseline": baseline}
    write_text_atomic(out_dir / "info.json", json.dumps(info, indent=2))
    return paths


def add_command(data_commands) -> None:
    """Wire `vlmkit data synth-highres` (the options live here, so cli.py only calls this)."""

    def run(args) -> None:
        sizes = {split: getattr(args, split) for split in DEFAULT_SIZES if getattr(args, split) is not None}
        paths = synth_highres(Path(args.out), args.seed, sizes, args.image_size, args.workers, args.max_objects,
                              tuple(args.object_size))
        for split, path in paths.items():
            print(f"{split}: {path}")

    command = data_commands.add_parser("synth-highres", help="write the built-in high-resolution task (fine "
                                       "patterns a 64 px view cannot resolve; measures image slicing)")
    command.add_argument("--out", default="data/synth-highres", help="output folder (default: data/synth-highres)")
    command.add_argument("--seed", type=int, default=0)
    for split, n in DEFAULT_SIZES.items():
        command.add_argument(f"--{split}", type=int, help=f"number of {split} records (default: {n})")
    command.add_argument("--image-size", type=int, default=256)
    command.add_argument("--max-objects", type=int, default=3, help="objects per scene (default: 3; 1 needs no "
                         "colour-to-object binding)")
    command.add_argument("--object-size", type=float, nargs=2, default=list(OBJECT_SIZE), metavar=("MIN", "MAX"),
                         help="object diameters in px of a 256 px image (default: 14 20)")
    command.add_argument("--workers", type=int, help="processes (default: one per core)")
    command.set_defaults(func=run)
