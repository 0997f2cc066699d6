"""Opening images safely: every failure becomes a DataError that names the image and the fix.

Only the formats in ALLOWED_FORMATS are decoded, whatever the file's name or a data: URL claims:
PIL would otherwise hand an EPS file to Ghostscript, a program run on the caller's bytes. Size,
smallest side and aspect ratio are checked from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlmkit.errors import DataError

DEFAULT_MAX_PIXELS = 64_000_000  # ~ 8000 x 8000; larger inputs are refused, never decoded
DEFAULT_MIN_SIDE = 4
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # every other decoder is refused unread
# Long side over short side. Padding to a square costs the long side squared, so a 2 KB PNG of
# 4x60000 pixels would ask for 60000x60000; past 1:50 an image is a strip, not a photo or a page.
MAX_ASPECT_RATIO = 50


def open_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE,
               decode: bool = True) -> Image.Image:
    """Open an image from a path or bytes, check its size from the header, then (if `decode`) decode it as RGB.

    Checking the header first means a decompression bomb, or a strip beyond 1:MAX_ASPECT_RATIO,
    is refused before any pixel is decoded. Formats outside ALLOWED_FORMATS are not readable images.
    """
    name = "image bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    if name != "image bytes" and Path(source).exists() and not Path(source).is_file():
        # Opening a FIFO blocks until something writes to it; a device may never end.
        raise DataError("not a regular file (a directory, FIFO or device); give an image file", name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
            image = Image.open(handle, formats=ALLOWED_FORMATS)
    except FileNotFoundError:
        raise DataError("image file not found", name) from None
    except UnidentifiedImageError:
        raise DataError(f"not a readable image (vlmkit decodes {', '.join(ALLOWED_FORMATS)} only)", name) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, OSError) as err:
        raise DataError(f"not a readable image ({err.__class__.__name__}: {err})", name) from None
    width, height = image.size
    if width * height > max_pixels:
        raise DataError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; "
                        "downscale it or raise max_pixels", name)
    if min(width, height) < min_side:
        raise DataError(f"image is {width}x{height}; each side must be at least {min_side} pixels", name)
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(f"image is {width}x{height}, beyond the aspect ratio limit of 1:{MAX_ASPECT_RATIO} (padded to "
                        "a square it would take too much memory); crop it or cut it into pieces", name)
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
    so it shows the model nothing (`vlmkit eval --blind`)."""
    return Image.new("RGB", image.size, tuple(round(255 * m) for m in mean))
