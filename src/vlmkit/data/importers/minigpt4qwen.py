"""MiniGPT4Qwen's instruction JSON: a list of `{"image", "instruction", "output"}`.

The image is marked in the instruction with MiniGPT-4's `<Img><ImageHere></Img>` (or left
unmarked). A sample may have `"video"` instead: a folder of frame images or a list of
them, which become one image per frame (vlmkit's models take frames as images). Video
files themselves must have their frames extracted first.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlmkit.data.importers.source import field, load_json
from vlmkit.processing.markers import IMAGE_MARKER
from vlmkit.errors import DataError

PLACEHOLDER = re.compile(r"<Img>\s*<ImageHere>\s*</Img>|<ImageHere>")
FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _frames(video, images: Path, source: Path, index: int) -> list[str]:
    if isinstance(video, list):
        return video
    folder = images / video
    if not folder.is_dir():
        raise DataError(f"video {video!r} is not a folder of frames; extract them first (for example "
                        f"ffmpeg -i {video} -vf fps=1 frames/%04d.png) and point 'video' at the folder", source,
                        index + 1)
    frames = sorted(str(p.relative_to(images)) for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise DataError(f"video folder {folder} holds no frame images", source, index + 1)
    return frames


def read(source: Path, images: Path, out_dir: Path) -> list[dict]:
    records = []
    for index, item in enumerate(load_json(source)):
        instruction = field(item, "instruction", source, index)
        output = field(item, "output", source, index)
        if "video" in item:
            paths = _frames(item["video"], images, source, index)
            instruction = PLACEHOLDER.sub("", instruction).strip()
            instruction = (IMAGE_MARKER * len(paths)) + "\n" + instruction  # the frames, in order, before the text
        else:
            paths = [field(item, "image", source, index)]
            instruction = PLACEHOLDER.sub(IMAGE_MARKER, instruction)
        conversations = [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
        records.append({"id": str(item.get("id", f"minigpt4qwen-{index}")), "images": paths,
                        "conversations": conversations})
    return records
