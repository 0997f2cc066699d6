"""Procedural scenes for the built-in data: coloured shapes in a 2x2 grid, or a rendered word.

A scene is plain data (objects with shape, colour, size and grid cell, or a word); `render`
turns it into a PIL image and `caption` into an English description. Everything is drawn
with PIL from a seeded `random.Random`, so the same seed gives the same pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (36, 80, 220),
    "yellow": (232, 200, 20),
    "purple": (140, 58, 182),
    "orange": (245, 128, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
SIZES = {"small": 0.42, "large": 0.80}  # object diameter as a fraction of its grid cell
CELLS = ("top left", "top right", "bottom left", "bottom right")
WORDS = (
    "sun", "cat", "dog", "box", "red", "map", "key", "cup", "pen", "bus", "car", "egg", "fox", "hat", "ice",
    "jam", "kit", "leg", "man", "net", "owl", "pig", "rat", "sky", "toy", "van", "web", "zoo", "bed", "fan",
    "art", "bag", "cow", "day", "eye", "fig", "gum", "hen", "ink", "jet", "lab", "mud", "nut", "oak", "pot",
    "ram", "sea", "tea", "urn", "wax", "yak", "zip", "moon", "star", "tree", "fish", "bird", "door", "lamp", "milk",
    "ship", "rain", "snow", "wind", "rock", "leaf", "rose", "king", "gold", "ring",
)
SUPERSAMPLE = 4  # draw large, then downsample: anti-aliased edges without a dependency


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # index into CELLS

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass
class Scene:
    """Shapes in distinct grid cells, or (when `word` is set) a single rendered word."""

    objects: list[Obj] = field(default_factory=list)
    word: str | None = None
    word_colour: str | None = None
    seed: int = 0  # drives the pixel-level jitter of `render`

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum(1 for o in self.objects if (shape in (None, o.shape)) and (colour in (None, o.colour)))


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow ships a scalable font (Aileron) inside the wheel, so no font files are needed.
    return ImageFont.load_default(size=size)


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.86  # same visual area as the circle, roughly
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of `image_size` x `image_size` pixels."""
    rng = random.Random(scene.seed)
    big = image_size * SUPERSAMPLE
    background = _jitter(rng, (240, 240, 240), 14)
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    if scene.word is not None:
        font = _font(int(big * rng.uniform(0.26, 0.34)))
        left, top, right, bottom = draw.textbbox((0, 0), scene.word, font=font)
        width, height = right - left, bottom - top
        x = rng.uniform(0.04 * big, max(0.04 * big, big - width - 0.04 * big)) - left
        y = rng.uniform(0.1 * big, max(0.1 * big, big - height - 0.1 * big)) - top
        draw.text((x, y), scene.word, font=font, fill=_jitter(rng, COLOURS[scene.word_colour], 12))
    cell = big / 2
    for obj in scene.objects:
        r = SIZES[obj.size] * cell / 2 * rng.uniform(0.92, 1.05)
        slack = cell / 2 - r - cell * 0.04
        cx = (obj.cell % 2) * cell + cell / 2 + rng.uniform(-slack, slack)
        cy = (obj.cell // 2) * cell + cell / 2 + rng.uniform(-slack, slack)
        _draw_shape(draw, obj.shape, cx, cy, r, _jitter(rng, COLOURS[obj.colour], 12))
    return image.resize((image_size, image_size), Image.LANCZOS)


def caption(scene: Scene) -> str:
    """A full description, cell by cell in reading order, each cell named before its object
    ("at the top left, a large purple circle; at the bottom right, a small red cross."), or
    the word and its colour."""
    if scene.word is not None:
        return f'the word "{scene.word}" written in {scene.word_colour}.'
    objects = sorted(scene.objects, key=lambda o: o.cell)
    parts = [f"at the {CELLS[o.cell]}, a {o.size} {o.colour} {o.shape}" for o in objects]
    return "; ".join(parts) + "."


def fact_list(scene: Scene, rng: random.Random) -> str:
    """Terse facts: every cell in reading order, named before its content ("top left: square red
    small. top right: empty. ..."), then one count per a random shape and colour.

    Naming the cell first is what lets a model trained from scratch get started: to write the
    next fact it only has to look at the image token of a cell it has just been told, so the
    vision tower is asked for each object's shape, colour and size long before the language
    model can find an object by its content. Shape comes first, where the model's attention
    is already on the named cell: with shape and colour in random order it bet on the easier
    colour there, and learnt shape at half the speed (examples/shapes/README.md)."""
    if scene.word is not None:
        return f"text {scene.word} {scene.word_colour}."
    by_cell = {o.cell: o for o in scene.objects}
    facts = [f"{name}: {by_cell[cell].shape} {by_cell[cell].colour} {by_cell[cell].size}." if cell in by_cell
             else f"{name}: empty." for cell, name in enumerate(CELLS)]
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    facts.append(f"{PLURALS[shape]} {scene.count(shape=shape)}. {colour} {scene.count(colour=colour)}. "
                 f"total {len(scene.objects)}.")
    return " ".join(facts)
