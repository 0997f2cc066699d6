import json
import random
from collections import Counter

import numpy as np
from PIL import Image

from vlmkit.cli import main
from vlmkit.data.records import read_records
from vlmkit.data.synth_highres import PATTERNS, SLICE_GRIDS, make_record, make_scene, render

SIZE, VIEW, WINDOW = 256, 64, 24


def test_records_are_pure_balanced_and_ask_about_a_uniquely_coloured_object():
    a, scene = make_record(1, "test", 5)
    again, scene_again = make_record(1, "test", 5)
    assert a == again and render(scene).tobytes() == render(scene_again).tobytes()
    answers = Counter(make_record(0, "test", i)[0]["conversations"][1]["content"] for i in range(40))
    assert answers == {pattern: 10 for pattern in PATTERNS}
    for i in range(40):
        record, scene = make_record(0, "train", i)
        colours = [o.colour for o in scene.objects]
        assert len(set(colours)) == len(colours)
        assert colours[0] in record["conversations"][0]["content"]


def test_objects_stay_inside_one_slice_of_every_grid_and_apart():
    for i in range(200):
        scene = make_scene(random.Random(i), PATTERNS[i % 4], SIZE)
        for obj in scene.objects:
            half = obj.diameter / 2
            for grid in SLICE_GRIDS:
                for axis in (obj.cx, obj.cy):
                    assert int((axis - half) * grid // SIZE) == int((axis + half) * grid // SIZE), (i, grid)
        for a in scene.objects:
            for b in scene.objects:
                if a is not b:
                    assert np.hypot(a.cx - b.cx, a.cy - b.cy) > (a.diameter + b.diameter) / 2


def _spectrum(image: Image.Image, obj, view: int) -> np.ndarray:
    """Log |FFT| of a window around the object, seen at `view` px: phase-free, so the stripes' random
    phase does not matter. The window is resampled at the object's exact centre, which favours the low views."""
    factor = image.size[0] / view
    seen = image if view == image.size[0] else image.resize((view, view), Image.BICUBIC)
    cx, cy, w = obj.cx / factor, obj.cy / factor, WINDOW / factor
    window = seen.transform((WINDOW, WINDOW), Image.EXTENT, (cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2),
                            Image.BILINEAR)
    pixels = np.asarray(window.convert("L"), np.float32)
    spectrum = np.log1p(np.abs(np.fft.fft2(pixels - pixels.mean()))).ravel()  # log: weak residues count too
    spectrum -= spectrum.mean()
    return spectrum / (np.linalg.norm(spectrum) + 1e-6)


def test_the_pattern_is_lost_in_a_64_px_view_and_readable_in_slices():
    """Nearest-centroid on the object's spectrum: chance (25 %) at 64 px, near perfect at the resolution
    that 2x2, 3x3 and 4x4 slices give the whole image (128, 192 and 256 px)."""
    scenes = [make_scene(random.Random(i), PATTERNS[i % 4], SIZE) for i in range(400)]
    images = [render(scene) for scene in scenes]
    labels = np.array([PATTERNS.index(scene.objects[0].pattern) for scene in scenes])
    train, test = slice(0, 300), slice(300, None)
    accuracy = {}
    for view in (SIZE, SIZE * 3 // 4, SIZE // 2, VIEW):  # 4x4, 3x3, 2x2 slices' resolution; the view
        features = np.stack([_spectrum(image, scene.objects[0], view) for image, scene in zip(images, scenes)])
        centroids = np.stack([features[train][labels[train] == k].mean(0) for k in range(len(PATTERNS))])
        predicted = ((features[test][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        accuracy[view] = (predicted == labels[test]).mean()
    assert accuracy[SIZE] >= 0.95 and accuracy[SIZE * 3 // 4] >= 0.9 and accuracy[SIZE // 2] >= 0.9, accuracy
    assert accuracy[VIEW] <= 0.4, accuracy


def test_the_command_writes_splits_images_and_info(tmp_path, capsys):
    out = tmp_path / "hr"
    assert main(["data", "synth-highres", "--out", str(out), "--train", "6", "--val", "0", "--test", "5",
                 "--image-size", "128", "--workers", "1"]) == 0
    assert "test:" in capsys.readouterr().out and not (out / "val.jsonl").exists()
    records, _ = read_records(out / "test.jsonl")
    assert len(records) == 5 and Image.open(records[0].images[0]).size == (128, 128)
    info = json.loads((out / "info.json").read_text())
    assert info["answers"] == list(PATTERNS) and info["majority_baseline"] == {"train": 2 / 6, "test": 2 / 5}
    assert main(["data", "synth-highres", "--out", str(out), "--image-size", "64"]) == 2
    assert "image_size 64 is too small" in capsys.readouterr().err
