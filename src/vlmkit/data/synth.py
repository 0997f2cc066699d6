"""`vlmkit data synth`: the built-in visual question answering data, made on the spot.

Questions come in eight categories (colour, shape, count, position, size, existence, text,
compare). Each question is made by choosing its answer first and then building a scene
that has it, so every category's answers are close to uniform and "always answer the most
common answer" stays a weak baseline. Splits:

- train: one image (or two, for compare) with several question turns, for SFT;
- captions: one image with a full description (prose, or a terse fact list), for the alignment stage;
- val, test: one question per record, balanced over categories;
- compositional: like test, but every question is about an object whose colour-shape pair
  never appears in the train, captions, val or test scenes (each colour and each shape does).

Record i of a split depends only on (seed, split, i), so output is reproducible and the
work can be spread over processes.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vlmkit.data.scenes import CELLS, COLOURS, PLURALS, SHAPES, SIZES, WORDS, Obj, Scene, caption, fact_list, render
from vlmkit.data.workers import worker_pool
from vlmkit.files import write_text_atomic

CATEGORIES = ("colour", "shape", "count", "position", "size", "existence", "text", "compare")
# One held-out pair per colour; each shape keeps at least three colours in training.
HELD_OUT_PAIRS = frozenset(
    {("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"), ("purple", "diamond"),
     ("orange", "circle")}
)
ALL_PAIRS = frozenset((c, s) for c in COLOURS for s in SHAPES)
TRAIN_PAIRS = ALL_PAIRS - HELD_OUT_PAIRS
FACTS_PROMPT = "List the objects."
# Two phrasings of each kind of question. Every question, first turn or extra turn, picks one at
# random, so the training turns ask in the test split's words, equally often. (Extra turns once
# always used the first phrasing; the model then answered "What size is the circle?" with colours.)
PHRASINGS = {
    "colour": ("What colour is the {ref}?", "Which colour does the {ref} have?"),
    "shape": ("What shape is the {colour} object?", "Which shape is {colour}?"),
    "position": ("Where is the {ref}?", "In which corner is the {ref}?"),
    "size": ("Is the {ref} small or large?", "What size is the {ref}?"),
    "count": ("How many {noun} are there?", "Count the {noun}."),
    "existence": ("Is there a {colour} {shape}?", "Does the image contain a {colour} {shape}?"),
    "text": ("What does the text say?", "What word is written in the image?"),
    "compare": ("Which image has more {noun}?", "Which of the two images shows more {noun}?"),
}
# Half the captions are of a word: a vision tower needs far more examples to read the 70 words
# than to see colours and shapes, and the captions are where the shapes example's vision stage
# learns both. With a share of 0.35 its tower named 0.02-0.06 of the test's words, with 0.5 0.89
# (examples/shapes/README.md).
WORD_CAPTION_SHARE = 0.5
CAPTION_PROMPTS = ("Describe the image.", "What is in this picture?", "Give a short description of the image.")


@dataclass
class QA:
    category: str
    question: str
    answer: str


class _Maker:
    """Builds scenes and questions from one rng; `targets` are the pairs questions are about."""

    def __init__(self, rng: random.Random, targets: frozenset, compositional: bool = False):
        self.rng, self.targets, self.compositional = rng, sorted(targets), compositional

    def pick(self, options):
        return self.rng.choice(list(options))

    def obj(self, cell: int, accept=lambda shape, colour: True, pairs=TRAIN_PAIRS) -> Obj:
        options = [(c, s) for c, s in sorted(pairs) if accept(s, c)]
        colour, shape = self.pick(options)
        return Obj(shape, colour, self.pick(SIZES), cell)

    def scene(self, fixed: list[tuple[str, str, str | None]], accept_other, n_total: int | None = None) -> Scene:
        """Place `fixed` (shape, colour, size-or-None) objects, then fill up with accepted random ones."""
        n_total = max(len(fixed), n_total if n_total is not None else self.rng.randint(1, len(CELLS)))
        cells = self.rng.sample(range(len(CELLS)), n_total)
        objects = [Obj(s, c, size or self.pick(SIZES), cells[i]) for i, (s, c, size) in enumerate(fixed)]
        objects += [self.obj(cell, accept_other) for cell in cells[len(fixed):]]
        return Scene(objects=objects, seed=self.rng.randrange(2**31))

    def ask(self, kind: str, **fields: str) -> str:
        """One of the question kind's phrasings, at random, filled in."""
        return self.pick(PHRASINGS[kind]).format(**fields)


def _ref(obj: Obj, by: str) -> str:
    return f"{obj.shape}" if by == "shape" else f"{obj.colour} object"


def make_question(maker: _Maker, category: str) -> tuple[list[Scene], QA]:
    """Build the scene(s) for one question of `category` about a pair from the maker's targets."""
    rng, ask = maker.rng, maker.ask
    colour, shape = maker.pick(maker.targets)
    if category == "colour":
        scene = maker.scene([(shape, colour, None)], lambda s, c: s != shape)
        q = ask("colour", ref=shape)
        return [scene], QA(category, q, colour)
    if category == "shape":
        scene = maker.scene([(shape, colour, None)], lambda s, c: c != colour)
        q = ask("shape", colour=colour)
        return [scene], QA(category, q, shape)
    if category in ("position", "size"):
        by = maker.pick(("shape", "colour"))
        accept = (lambda s, c: s != shape) if by == "shape" else (lambda s, c: c != colour)
        scene = maker.scene([(shape, colour, None)], accept)
        target = scene.objects[0]
        ref = _ref(target, by)
        if category == "position":
            q = ask("position", ref=ref)
            return [scene], QA(category, q, CELLS[target.cell])
        q = ask("size", ref=ref)
        return [scene], QA(category, q, target.size)
    if category == "count":
        # Compositional questions must be about a held-out object, so count at least one of it.
        n = rng.randint(1 if maker.compositional else 0, len(CELLS))
        scenes, noun, n = _count_scene(maker, colour, shape, n, "shape" if maker.compositional else None)
        q = ask("count", noun=noun)
        return scenes, QA(category, q, str(n))
    if category == "existence":
        present = rng.random() < 0.5
        if present:
            scene = maker.scene([(shape, colour, None)], lambda s, c: True)
        else:  # a hard negative: another object shares exactly one of the two attributes
            near_colour, near_shape = maker.pick(
                [(c, s) for c, s in sorted(TRAIN_PAIRS) if (c == colour) != (s == shape)])
            scene = maker.scene([(near_shape, near_colour, None)], lambda s, c: (c, s) != (colour, shape))
        q = ask("existence", colour=colour, shape=shape)
        return [scene], QA(category, q, "yes" if present else "no")
    if category == "text":
        word_colour = maker.pick(COLOURS)
        scene = Scene(word=maker.pick(WORDS), word_colour=word_colour, seed=rng.randrange(2**31))
        q = ask("text")
        return [scene], QA(category, q, scene.word)
    if category == "compare":
        n1, n2 = rng.sample(range(len(CELLS) + 1), 2)
        by = maker.pick(("shape", "colour"))
        first, noun, _ = _count_scene(maker, colour, shape, n1, by)
        second, _, _ = _count_scene(maker, colour, shape, n2, by)
        q = ask("compare", noun=noun)
        return first + second, QA(category, q, "first" if n1 > n2 else "second")
    raise ValueError(f"unknown category {category!r}")


def _count_scene(maker: _Maker, colour: str, shape: str, n: int, by: str | None = None):
    """A scene with exactly `n` objects of the counted kind (a shape, a colour, or any object)."""
    by = by or maker.pick(("shape", "colour", "all"))
    if by == "all":
        n = max(n, 1)
        return [maker.scene([], lambda s, c: True, n_total=n)], "objects", n
    is_counted = (lambda s, c: s == shape) if by == "shape" else (lambda s, c: c == colour)
    # The first counted object uses the target pair; the rest are any counted training pairs.
    fixed = [(shape, colour, None)] if n else []
    for _ in range(n - 1):
        # Sorted: a set of strings iterates in an order that changes from process to process
        # (string hashing is randomised), so the same seed would give other records.
        c, s = maker.pick(sorted(p for p in TRAIN_PAIRS if is_counted(p[1], p[0])))
        fixed.append((s, c, None))
    n_total = maker.rng.randint(max(n, 1), len(CELLS))
    scene = maker.scene(fixed, lambda s, c: not is_counted(s, c), n_total=n_total)
    noun = PLURALS[shape] if by == "shape" else f"{colour} objects"
    return [scene], noun, n


def scene_questions(maker: _Maker, scene: Scene) -> list[QA]:
    """Every question the scene answers unambiguously (used for extra training turns).

    Phrasings and answers follow the first turns' distribution where the scene allows: counts and
    existence ask about an object in the scene half of the time (about a random one, most answers
    would be "0" and "no", and the model would learn to say so), and a missing object shares its
    colour or its shape with one that is there, as the first turns' hard negatives do."""
    ask = maker.ask
    if scene.word is not None:
        return [QA("text", ask("text"), scene.word), QA("colour", "What colour is the text?", scene.word_colour)]
    out = []
    for obj in scene.objects:
        for by, key in (("shape", "shape"), ("colour", "colour")):
            if sum(getattr(o, key) == getattr(obj, key) for o in scene.objects) != 1:
                continue
            ref = _ref(obj, by)
            if by == "shape":
                out.append(QA("colour", ask("colour", ref=obj.shape), obj.colour))
            else:
                out.append(QA("shape", ask("shape", colour=obj.colour), obj.shape))
            out.append(QA("position", ask("position", ref=ref), CELLS[obj.cell]))
            out.append(QA("size", ask("size", ref=ref), obj.size))
    shape = maker.pick(scene.objects).shape if maker.rng.random() < 0.5 else maker.pick(SHAPES)
    colour = maker.pick(scene.objects).colour if maker.rng.random() < 0.5 else maker.pick(COLOURS)
    out.append(QA("count", ask("count", noun=PLURALS[shape]), str(scene.count(shape=shape))))
    out.append(QA("count", ask("count", noun=f"{colour} objects"), str(scene.count(colour=colour))))
    out.append(QA("count", ask("count", noun="objects"), str(len(scene.objects))))
    out.append(_existence_question(maker, scene))
    return out


def compare_questions(maker: _Maker, first: Scene, second: Scene, asked: str) -> list[QA]:
    """A question for each noun (a shape, a colour, or "objects") whose counts in the two scenes differ,
    but for the noun of the question `asked`."""
    nouns = [(PLURALS[s], {"shape": s}) for s in SHAPES] + [(f"{c} objects", {"colour": c}) for c in COLOURS]
    out = []
    for noun, kind in nouns + [("objects", {})]:
        n1, n2 = first.count(**kind), second.count(**kind)
        if n1 != n2 and asked not in (p.format(noun=noun) for p in PHRASINGS["compare"]):
            out.append(QA("compare", maker.ask("compare", noun=noun), "first" if n1 > n2 else "second"))
    return out


def _existence_question(maker: _Maker, scene: Scene) -> QA:
    present = {(o.colour, o.shape) for o in scene.objects}
    near = [(c, s) for c, s in sorted(TRAIN_PAIRS - present)
            if any((c == pc) != (s == ps) for pc, ps in present)]
    c, s = maker.pick(sorted(present)) if maker.rng.random() < 0.5 or not near else maker.pick(near)
    return QA("existence", maker.ask("existence", colour=c, shape=s), "yes" if (c, s) in present else "no")


def _image_refs(scenes, split: str, index: int) -> list[str]:
    return [f"images/{split}/{index:06d}-{j}.png" for j in range(len(scenes))]


def make_record(seed: int, split: str, index: int, turns: int = 1) -> tuple[dict, list[Scene]]:
    """Record `index` of `split`, a pure function of its arguments."""
    rng = random.Random(f"{seed}-{split}-{index}")
    compositional = split == "compositional"
    maker = _Maker(rng, HELD_OUT_PAIRS if compositional else TRAIN_PAIRS, compositional)
    if split == "captions":
        scenes = [_caption_scene(maker)]
        # Half prose, half fact lists; never both in one record, or the second would be copied from the first.
        prompt, text = ((FACTS_PROMPT, fact_list(scenes[0], rng)) if rng.random() < 0.5
                        else (maker.pick(CAPTION_PROMPTS), caption(scenes[0])))
        conversations = [{"role": "user", "content": "<image>\n" + prompt}, {"role": "assistant", "content": text}]
        category = "caption"
    else:
        categories = [c for c in CATEGORIES if not (split == "compositional" and c == "text")]
        category = categories[index % len(categories)]  # balanced over categories
        scenes, qa = make_question(maker, category)
        qas = [qa]
        if turns > 1 and category == "compare":
            # Comparisons of other nouns than the first question's. With one turn to a compare record, where
            # the others carry five, compare got about 1 turn in 33 and was learnt least.
            extra = compare_questions(maker, *scenes, asked=qa.question)
            qas += rng.sample(extra, min(turns - 1, len(extra)))
            rng.shuffle(qas)
        elif turns > 1:
            # Other kinds of question than the first: the same one in other words would give its answer away.
            extra = [q for q in scene_questions(maker, scenes[0]) if q.category != qa.category]
            by_category: dict[str, list[QA]] = {}
            for q in extra:
                by_category.setdefault(q.category, []).append(q)
            for cat in rng.sample(sorted(by_category), min(turns - 1, len(by_category))):
                qas.append(rng.choice(by_category[cat]))
            rng.shuffle(qas)
        markers = "<image>\n" * len(scenes)
        conversations = []
        for i, q in enumerate(qas):
            conversations.append({"role": "user", "content": (markers if i == 0 else "") + q.question})
            conversations.append({"role": "assistant", "content": q.answer})
    record = {"id": f"{split}-{index:06d}", "images": _image_refs(scenes, split, index),
              "conversations": conversations, "category": category}
    return record, scenes


def _caption_scene(maker: _Maker) -> Scene:
    if maker.rng.random() < WORD_CAPTION_SHARE:
        return Scene(word=maker.pick(WORDS), word_colour=maker.pick(COLOURS), seed=maker.rng.randrange(2**31))
    return maker.scene([], lambda s, c: True)


def _write_chunk(args) -> list[dict]:
    out_dir, seed, split, start, stop, turns, image_size = args
    records = []
    for index in range(start, stop):
        record, scenes = make_record(seed, split, index, turns)
        for ref, scene in zip(record["images"], scenes):
            render(scene, image_size).save(out_dir / ref)
        records.append(record)
    return records


def write_split(out_dir: Path, split: str, n: int, seed: int, turns: int = 1, image_size: int = 64,
                workers: int | None = None, progress: bool = True) -> Path:
    """Render `n` records of `split` into `out_dir/images/split/` and write `out_dir/split.jsonl` atomically."""
    out_dir = Path(out_dir)
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    chunk = 256
    jobs = [(out_dir, seed, split, s, min(s + chunk, n), turns, image_size) for s in range(0, n, chunk)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    path = out_dir / f"{split}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    bar = tqdm(total=n, desc=f"synth {split}", unit="rec", disable=not progress)
    with tmp.open("w", encoding="utf-8") as handle:
        pool = worker_pool(workers) if workers > 1 else None
        results = pool.map(_write_chunk, jobs) if pool else map(_write_chunk, jobs)
        for records in results:
            for record in records:
                handle.write(json.dumps(record) + "\n")
            bar.update(len(records))
        if pool:
            pool.shutdown()
    bar.close()
    tmp.replace(path)
    return path


# Bumped whenever the same (seed, split, index) would give other records, so that `make demo`
# never trains on data an older generator wrote.
DATA_VERSION = 7
DEFAULT_SIZES = {"train": 24000, "captions": 12000, "val": 400, "test": 1600, "compositional": 700}


def synth(out_dir: Path, seed: int = 0, sizes: dict | None = None, turns: int = 5, image_size: int = 64,
          workers: int | None = None, progress: bool = True) -> dict[str, Path]:
    """Write every split of the built-in data set; returns split name -> JSONL path."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in sizes.items():
        if n > 0:
            paths[split] = write_split(out_dir, split, n, seed, turns if split == "train" else 1, image_size,
                                       workers, progress)
    info = {"version": DATA_VERSION, "seed": seed, "image_size": image_size, "turns": turns, "sizes": sizes,
            "categories": CATEGORIES, "held_out_pairs": sorted(HELD_OUT_PAIRS)}
    write_text_atomic(out_dir / "info.json", json.dumps(info, indent=2))
    return paths
