"""Video input: decode a clip with PyAV, sample frames, and let the rest of the pipeline see them as images.

A record's `<video>` marker becomes one `<image>` marker per sampled frame, each on its own
line after the frame's time ("0.5s: <image>"), so the processor, the model and the chat
template need nothing video-specific; the times let a model answer "when" questions.

Frames are chosen in two steps, like images are opened (header first, pixels later):
`probe_video` reads only the container's packets (no decoding) to learn every frame's
presentation time and which frames sampling picks; `read_video` then decodes just those.

Sampling:
- uniform (default): the middle frame of each of `num_frames` equal segments of the clip;
- fixed rate (`fps`): the frame on screen at 0, 1/fps, 2/fps, ... seconds (each frame at
  most once); a clip long enough to give more than `max_frames` falls back to uniform
  sampling of `max_frames`, so the whole clip stays covered.

PyAV (`pip install 'vlmkit[video]'`) bundles its own FFmpeg; it is imported only when a
video is read, so image-only users never need it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmkit.processing.markers import IMAGE_MARKER, VIDEO_MARKER
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.images import DEFAULT_MAX_PIXELS

DEFAULT_NUM_FRAMES = 8
DEFAULT_MAX_FRAMES = 32


@dataclass(frozen=True)
class VideoProbe:
    """What sampling will give, known without decoding a pixel."""

    size: tuple[int, int]  # (width, height) of every frame
    timestamps: list[float]  # seconds from the first frame, one per sampled frame, ascending
    frame_times: list[float]  # every frame of the clip
    pts: list[int]  # the sampled frames' presentation timestamps, in stream time-base units


def _av(path):
    try:
        import av
    except ImportError:  # a setup problem, not a bad record: never skipped by skip_bad
        raise ConfigError(f"reading the video {path} needs PyAV: pip install 'vlmkit[video]'") from None
    return av


def check_sampling(num_frames: int | None, fps: float | None, max_frames: int) -> None:
    """Raise ConfigError for sampling settings that cannot pick any frame."""
    if max_frames < 1:
        raise ConfigError(f"max_frames must be at least 1, got {max_frames}")
    if fps is not None and not fps > 0:
        raise ConfigError(f"fps must be positive, got {fps}")
    if fps is None and (num_frames is None or num_frames < 1):
        raise ConfigError(f"num_frames must be at least 1, got {num_frames}")


def uniform_indices(n_frames: int, k: int) -> list[int]:
    """The middle frame of each of `k` equal segments of `n_frames` (all frames when k >= n_frames)."""
    if k >= n_frames:
        return list(range(n_frames))
    return [int((i + 0.5) * n_frames / k) for i in range(k)]


def rate_indices(frame_times: list[float], fps: float, max_frames: int) -> list[int]:
    """The frame on screen at each multiple of 1/fps; uniform over `max_frames` when that gives more."""
    # The clip ends one frame after its last frame starts; ticks run from 0 up to that end.
    end = frame_times[-1] + (frame_times[-1] - frame_times[-2] if len(frame_times) > 1 else 0.0)
    n_samples = max(1, math.ceil(end * fps - 1e-6))
    if n_samples > max_frames:
        return uniform_indices(len(frame_times), max_frames)
    chosen, i = [], 0
    for j in range(n_samples):
        t = j / fps + 1e-6  # tolerance: a frame stamped 0.49999 s is "on screen" at 0.5 s
        while i + 1 < len(frame_times) and frame_times[i + 1] <= t:
            i += 1
        if not chosen or chosen[-1] != i:  # above the clip's own rate, a frame would repeat
            chosen.append(i)
    return chosen


def _open(path: Path):
    av = _av(path)
    if not path.is_file():  # a FIFO or device would block the reader, so it is refused too
        raise DataError("not a regular file (a directory, FIFO or device)" if path.exists() else "video file not found",
                        path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise DataError(f"not a readable video ({err.__class__.__name__}: {err})", path) from None
    if not container.streams.video:
        container.close()
        raise DataError("has no video stream", path)
    return av, container, container.streams.video[0]


def probe_video(path: str | Path, num_frames: int | None = DEFAULT_NUM_FRAMES, fps: float | None = None,
                max_frames: int = DEFAULT_MAX_FRAMES, max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoProbe:
    """Frame size and the times of the frames sampling picks, from the packets alone (nothing decoded).

    `fps` (when given) wins over `num_frames`; both are capped by `max_frames`. Raises DataError
    naming the file for a missing, unreadable, oversized or frameless video.
    """
    check_sampling(num_frames, fps, max_frames)
    path = Path(path)
    av, container, stream = _open(path)
    try:
        width, height, base = stream.codec_context.width, stream.codec_context.height, stream.time_base
        # Packets come in decode order; their presentation stamps, sorted, are the frames in display order.
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
    except av.error.FFmpegError as err:
        raise DataError(f"video data is corrupt ({err.__class__.__name__}: {err})", path) from None
    finally:
        container.close()
    if not pts:
        raise DataError("video has no frames", path)
    if width * height > max_pixels:
        raise DataError(f"video frames are {width}x{height} = {width * height} pixels, over the limit of "
                        f"{max_pixels}; downscale the video or raise max_pixels", path)
    frame_times = [float((p - pts[0]) * base) for p in pts]
    if fps is not None:
        chosen = rate_indices(frame_times, fps, max_frames)
    else:
        chosen = uniform_indices(len(pts), min(num_frames, max_frames))
    return VideoProbe((width, height), [frame_times[i] for i in chosen], frame_times, [pts[i] for i in chosen])


def read_video(path: str | Path, num_frames: int | None = DEFAULT_NUM_FRAMES, fps: float | None = None,
               max_frames: int = DEFAULT_MAX_FRAMES,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[Image.Image], list[float]]:
    """Sampled frames as PIL RGB images and their times in seconds (see `probe_video` for the options)."""
    path = Path(path)
    probe = probe_video(path, num_frames, fps, max_frames, max_pixels)
    av, container, stream = _open(path)
    wanted = set(probe.pts)
    frames: dict[int, Image.Image] = {}
    try:
        for frame in container.decode(stream):
            if frame.pts in wanted and frame.pts not in frames:
                frames[frame.pts] = frame.to_image().convert("RGB")
            if len(frames) == len(wanted):
                break
    except av.error.FFmpegError as err:
        raise DataError(f"video data is corrupt ({err.__class__.__name__}: {err})", path) from None
    finally:
        container.close()
    if len(frames) != len(wanted):
        raise DataError(f"video data is corrupt: decoded {len(frames)} of the {len(wanted)} sampled frames", path)
    return [frames[p] for p in probe.pts], probe.timestamps


def frame_text(timestamps: list[float], show_times: bool = True) -> str:
    """What one `<video>` marker becomes: one `<image>` line per frame, after its time when `show_times`."""
    return "\n".join(f"{t:.1f}s: {IMAGE_MARKER}" if show_times else IMAGE_MARKER for t in timestamps)


def expand_video_marker(text: str, timestamps: list[float], show_times: bool = True) -> str:
    """Replace the one `<video>` marker of `text` by the frames' `<image>` markers (see `frame_text`)."""
    if text.count(VIDEO_MARKER) != 1:
        raise DataError(f"text has {text.count(VIDEO_MARKER)} {VIDEO_MARKER} markers; expected exactly one")
    return text.replace(VIDEO_MARKER, frame_text(timestamps, show_times))


def expand_video_conversations(conversations: list[dict], timestamps: list[float],
                               show_times: bool = True) -> list[dict]:
    """A copy of `conversations` whose one `<video>` marker (in any turn) is expanded into frame markers."""
    n = sum(turn["content"].count(VIDEO_MARKER) for turn in conversations)
    if n != 1:
        raise DataError(f"conversations have {n} {VIDEO_MARKER} markers; a record with a video needs exactly one")
    return [{**turn, "content": expand_video_marker(turn["content"], timestamps, show_times)}
            if VIDEO_MARKER in turn["content"] else dict(turn) for turn in conversations]


def with_video_frames(conversations: list[dict], images: list, frames: list, timestamps: list[float],
                      show_times: bool = True) -> tuple[list[dict], list]:
    """Conversations with the `<video>` marker expanded, and `images` with `frames` spliced in at the
    marker's place, so the i-th `<image>` marker of the text goes with the i-th item of the list.

    Items may be anything one per image (PIL images, sizes, crop plans); `frames` and `timestamps`
    must be as long as each other.
    """
    if len(frames) != len(timestamps):
        raise ValueError(f"{len(frames)} frames but {len(timestamps)} timestamps")
    before = 0  # image markers ahead of the video marker, in reading order
    for turn in conversations:
        text = turn["content"]
        if VIDEO_MARKER in text:
            before += text[: text.index(VIDEO_MARKER)].count(IMAGE_MARKER)
            break
        before += text.count(IMAGE_MARKER)
    expanded = expand_video_conversations(conversations, timestamps, show_times)
    return expanded, [*images[:before], *frames, *images[before:]]
