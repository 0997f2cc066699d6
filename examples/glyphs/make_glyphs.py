"""Digits rendered in this machine's fonts, as vlmkit records, with whole font families held out.

A small real image classification set that vlmkit did not write: every TrueType/OpenType font
that fontconfig lists (symbol and dingbat fonts left out) draws the digits 0-9 at a random
size, position, rotation and shade. Fonts are split by family, every fourth family (sorted by
name) going to the test split only, so the test asks about letterforms never seen in training.

    python examples/glyphs/make_glyphs.py --out data/glyphs
    vlmkit train --train-data data/glyphs/train.jsonl --output-dir runs/glyphs
    vlmkit eval --model runs/glyphs --data data/glyphs/test.jsonl

Every record asks one question about one image, with its category (digit: 10-way; parity,
greater: 2-way). train.jsonl asks all three about each of its images, in records of their
own: asked in one conversation, the later answers could be read off the digit already said
instead of the image. test.jsonl asks one question, drawn at random, about each of its images.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SKIP_FAMILIES = ("Standard Symbols", "D050000L", "DejaVu Math")  # no ordinary digits
QUESTIONS = {
    "digit": ("Which digit is shown?", lambda d: str(d)),
    "parity": ("Is the digit even or odd?", lambda d: "even" if d % 2 == 0 else "odd"),
    "greater": ("Is the digit greater than four?", lambda d: "yes" if d > 4 else "no"),
}
SIZE = 96


def fonts() -> dict[str, list[str]]:
    """Font files by family, from fontconfig."""
    listing = subprocess.run(["fc-list", ":", "family", "file"], capture_output=True, text=True, check=True).stdout
    families: dict[str, list[str]] = {}
    for line in listing.splitlines():
        path, _, family = line.partition(": ")
        family = family.split(",")[0].strip()
        if path.endswith((".ttf", ".otf")) and not family.startswith(SKIP_FAMILIES):
            families.setdefault(family, []).append(path)
    return {family: sorted(paths) for family, paths in sorted(families.items())}


def render(digit: int, font_path: str, rng: random.Random) -> Image.Image:
    paper, ink = rng.randint(200, 255), rng.randint(0, 80)
    glyph = Image.new("L", (SIZE * 2, SIZE * 2), 0)
    font = ImageFont.truetype(font_path, rng.randint(48, 80))
    ImageDraw.Draw(glyph).text((SIZE, SIZE), str(digit), fill=255, font=font, anchor="mm")
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    box = glyph.getbbox() or (0, 0, 1, 1)
    glyph = glyph.crop(box)
    image = Image.new("L", (SIZE, SIZE), paper)
    x = rng.randint(0, max(SIZE - glyph.width, 0))
    y = rng.randint(0, max(SIZE - glyph.height, 0))
    image.paste(Image.new("L", glyph.size, ink), (x, y), glyph)
    return image.convert("RGB")


def write_split(out: Path, name: str, font_paths: list[str], n: int, seed: int, every_question: bool) -> Path:
    rng = random.Random(f"{seed}-{name}")
    (out / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        digit, font_path = i % 10, rng.choice(font_paths)
        image_path = f"img/{name}-{i:05d}.png"
        render(digit, font_path, rng).save(out / image_path)
        for kind in list(QUESTIONS) if every_question else [rng.choice(list(QUESTIONS))]:
            question, answer = QUESTIONS[kind]
            turns = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer(digit)}]
            record = {"id": f"{name}-{i}" + (f"-{kind}" if every_question else ""), "images": [image_path],
                      "conversations": turns, "category": kind, "font": Path(font_path).name}
            lines.append(json.dumps(record))
    path = out / f"{name}.jsonl"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/glyphs")
    parser.add_argument("--train", type=int, default=1000, help="training images (three records each)")
    parser.add_argument("--test", type=int, default=600, help="test images (one record each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    families = fonts()
    held_out = list(families)[::4]
    if len(families) < 4:
        raise SystemExit(f"only {len(families)} font families found (fc-list); install more fonts first")
    train_fonts = [p for family, paths in families.items() if family not in held_out for p in paths]
    test_fonts = [p for family in held_out for p in families[family]]
    out = Path(args.out)
    write_split(out, "train", train_fonts, args.train, args.seed, every_question=True)
    write_split(out, "test", test_fonts, args.test, args.seed, every_question=False)
    info = {"train_families": [f for f in families if f not in held_out], "test_families": held_out,
            "train_fonts": len(train_fonts), "test_fonts": len(test_fonts)}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
