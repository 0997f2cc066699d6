"""Opening images safely: every failure becomes a DataError that names the image and the fix."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmkit.errors import DataError

DEFAULT_MAX_PIXELS = 64_000_000  # ~ 8000 x 8000; larger inputs are refused, never decoded
DEFAULT_MIN_SIDE = 4


def open_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
               decode: bool = True) -> Image.Image:  # fmt: skip
    """Open an image from a path or bytes, check its size from the header, then (if `decode`) decode it as RGB.

    Checking the header first means a decompression bomb is refused before any pixel is decoded.
    """
    name = "image bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
            image = Image.open(handle)
    except FileNotFoundError:
        raise DataError("image file not found", name) from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError) as err:
        raise DataError(f"not a readable image ({err.__class__.__name__}: {err})", name) from None
    width, height = image.size
    if width * height > max_pixels:
        raise DataError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
                        "downscale it or raise max_pixels", name)  # fmt: skip
    if min(width, height) < min_side:
        raise DataError(f"image is {width}x{height}; each side must be at least {min_side} pixels", name)
    if not decode:
        try:  # checks structure and checksums without decoding pixels; catches truncated files early
            image.verify()
        except Exception as err:  # noqa: BLE001 -- PIL raises many types here, all meaning "corrupt"
            raise DataError(f"image data is corrupt or truncated ({err})", name) from None
        return image  # verified: size and mode stay readable, pixels must be reopened to decode
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt pixel data
        raise DataError(f"image data is corrupt or truncated ({err})", name) from None


def blank_like(image: Image.Image, mean: list[float]) -> Image.Image:
    """An image of the same size in one colour, the processor's mean: it normalises to all zeros,
    so it shows the model nothing (`vlmkit eval --blind`, `data.blank_image_rate`)."""
    return Image.new("RGB", image.size, tuple(round(255 * m) for m in mean))
