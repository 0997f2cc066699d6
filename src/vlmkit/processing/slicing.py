"""High-resolution slicing: one image -> a global view plus a grid of crops, and their token layout.

Two schemes, both on PIL and `math` only:

- MiniCPM-V 2.6 adaptive slicing (`minicpm_slices`): pick a grid whose shape follows the image's
  aspect ratio and whose cell count follows its area, then resize so every slice is the same size,
  close to `slice_size`**2 pixels, with sides that are multiples of the patch size. Slices are not
  square, so the vision encoder must accept variable sizes (MiniCPM-V interpolates its position
  embeddings).
- LLaVA-NeXT AnyRes (`anyres_tiles`): pick the grid of `tile_size` squares that keeps the most of the
  image's resolution, resize and pad into it, cut into squares; every crop is exactly square.

`layout_text` writes the placeholder text for a sliced image and `crop_order` lists the crops in the
order their features must be scattered into those placeholders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from vlmkit.processing.markers import IMAGE_MARKER
from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.images import DEFAULT_MIN_SIDE

RESAMPLE = Image.BICUBIC


@dataclass
class SlicedImage:
    """A global view of the image plus its slices, row by row (top to bottom, left to right)."""

    whole: Image.Image
    rows: list[list[Image.Image]]
    grid: tuple[int, int] | None  # (cols, rows); None when the image was not sliced

    @property
    def slices(self) -> list[Image.Image]:
        """The slices in row-major order."""
        return [crop for row in self.rows for crop in row]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")


def _check_size(width: int, height: int, min_side: int = 1) -> None:
    min_side = max(min_side, 1)  # a zero or negative side is never an image, whatever the caller allows
    if width < min_side or height < min_side:
        raise DataError(f"image is {width}x{height}; slicing needs both sides of at least {min_side} pixels, "
                        "so drop or enlarge the image")


# --- MiniCPM-V adaptive slicing ---------------------------------------------------------------------


def _round_to(length: float, multiple: int) -> int:
    """`length` rounded to the nearest multiple of `multiple`, never below `multiple`."""
    return max(round(length / multiple) * multiple, multiple)


def grid_candidates(width: int, height: int, slice_size: int, max_slices: int) -> list[tuple[int, int]]:
    """Every (cols, rows) grid `slice_grid` chooses from; empty when the image needs no slicing."""
    _check_size(width, height)
    _check_positive(slice_size=slice_size, max_slices=max_slices)
    multiple = min(math.ceil(width * height / slice_size**2), max_slices)
    if multiple <= 1:
        return []
    # One cell fewer or more than the area asks for gives the aspect ratio more grids to match.
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if 1 < n <= max_slices]
    return [(cols, n // cols) for n in counts for cols in range(1, n + 1) if n % cols == 0]


def slice_grid(width: int, height: int, slice_size: int, max_slices: int) -> tuple[int, int] | None:
    """The (cols, rows) grid for an image of `width` x `height`, or None when one view is enough.

    Among `grid_candidates`, the grid whose shape is closest to the image's in log aspect ratio;
    ties go to the first candidate (fewer cells, then fewer columns), as in MiniCPM-V.
    """
    candidates = grid_candidates(width, height, slice_size, max_slices)
    if not candidates:
        return None
    log_ratio = math.log(width / height)
    return min(candidates, key=lambda grid: abs(log_ratio - math.log(grid[0] / grid[1])))


def best_size(width: float, height: float, slice_size: int, multiple: int, allow_upscale: bool) -> tuple[int, int]:
    """(width, height) with the image's aspect ratio and an area of about `slice_size`**2.

    Images already smaller than that keep their size unless `allow_upscale`. Each side is then
    rounded to a multiple of `multiple` (the encoder's patch size), at least one patch.
    """
    _check_positive(slice_size=slice_size, multiple=multiple)
    if width * height > slice_size**2 or allow_upscale:
        ratio = width / height
        height = int(slice_size / math.sqrt(ratio))
        width = int(height * ratio)
    return _round_to(width, multiple), _round_to(height, multiple)


def refine_size(width: int, height: int, grid: tuple[int, int], slice_size: int, multiple: int,
                allow_upscale: bool) -> tuple[int, int]:
    """The size to resize the whole image to before cutting it into `grid` equal slices.

    Each grid cell gets the `best_size` of a cell of the original image, so the slices all have
    the same size, close to `slice_size`**2 pixels, with sides that are multiples of `multiple`.
    """
    cols, rows = grid
    cell_width, cell_height = _round_to(width, cols) / cols, _round_to(height, rows) / rows
    best_width, best_height = best_size(cell_width, cell_height, slice_size, multiple, allow_upscale)
    return best_width * cols, best_height * rows


def _cut(image: Image.Image, grid: tuple[int, int]) -> list[list[Image.Image]]:
    cols, rows = grid
    cell_width, cell_height = image.width // cols, image.height // rows
    return [[image.crop((col * cell_width, row * cell_height, (col + 1) * cell_width, (row + 1) * cell_height))
             for col in range(cols)] for row in range(rows)]


def minicpm_slices(image: Image.Image, slice_size: int = 448, max_slices: int = 9, multiple: int = 14,
                   never_split: bool = False, min_side: int = DEFAULT_MIN_SIDE) -> SlicedImage:
    """Slice `image` as MiniCPM-V 2.6 does: a downscaled whole view plus up to `max_slices` slices.

    An image of at most about `slice_size`**2 pixels (or any image with `never_split`) is not sliced;
    its whole view is then scaled up or down to about `slice_size`**2 pixels.
    """
    _check_size(*image.size, min_side)
    image = image.convert("RGB")
    whole_size, grid, refined_size = minicpm_sizes(*image.size, slice_size, max_slices, multiple, never_split)
    whole = image.resize(whole_size, RESAMPLE)
    if grid is None:
        return SlicedImage(whole, [], None)
    return SlicedImage(whole, _cut(image.resize(refined_size, RESAMPLE), grid), grid)


def minicpm_sizes(width: int, height: int, slice_size: int, max_slices: int, multiple: int,
                  never_split: bool = False) -> tuple[tuple[int, int], tuple[int, int] | None, tuple[int, int] | None]:
    """`minicpm_slices` from the size alone: (whole view size, grid or None, size before cutting or None).

    Known from an image's header, so token counts are settled before any pixel is decoded.
    """
    _check_positive(slice_size=slice_size, max_slices=max_slices, multiple=multiple)
    grid = None if never_split else slice_grid(width, height, slice_size, max_slices)
    # Unsliced, the whole view is all the model sees, so small images are enlarged to use the tokens.
    whole = best_size(width, height, slice_size, multiple, allow_upscale=grid is None)
    if grid is None:
        return whole, None, None
    return whole, grid, refine_size(width, height, grid, slice_size, multiple, allow_upscale=True)


# --- LLaVA-NeXT AnyRes -------------------------------------------------------------------------------


def anyres_grids(max_tiles: int) -> list[tuple[int, int]]:
    """Every (cols, rows) grid of at most `max_tiles` tiles, 1x1 included, fewest rows first."""
    _check_positive(max_tiles=max_tiles)
    return [(cols, rows) for rows in range(1, max_tiles + 1) for cols in range(1, max_tiles // rows + 1)]


def select_best_resolution(size: tuple[int, int], resolutions: list[tuple[int, int]]) -> tuple[int, int]:
    """The (width, height) in `resolutions` that best fits an image of `size`, as LLaVA-NeXT picks it.

    First the most effective resolution (the image's pixels once scaled to fit, never counting more
    than it has), then the least wasted area (padding); ties go to the earliest resolution.
    """
    width, height = size
    best, best_key = None, None
    for res_width, res_height in resolutions:
        scale = min(res_width / width, res_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(res_width * res_height - effective))
        if best_key is None or key > best_key:
            best, best_key = (res_width, res_height), key
    if best is None:
        raise ConfigError("select_best_resolution needs at least one candidate resolution")
    return best


def anyres_grid(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The (cols, rows) grid of `tile_size` tiles AnyRes uses for an image of `width` x `height`."""
    _check_size(width, height)
    _check_positive(tile_size=tile_size)
    grids = anyres_grids(max_tiles)
    res_width, res_height = select_best_resolution((width, height), [(c * tile_size, r * tile_size) for c, r in grids])
    return res_width // tile_size, res_height // tile_size


def _fit_and_pad(image: Image.Image, target: tuple[int, int], fill: tuple[int, int, int]) -> Image.Image:
    """Resize `image` to fit inside `target` keeping its aspect ratio, centred on a `fill` canvas."""
    target_width, target_height = target
    scale = min(target_width / image.width, target_height / image.height)
    new_width = max(1, min(math.ceil(image.width * scale), target_width))
    new_height = max(1, min(math.ceil(image.height * scale), target_height))
    canvas = Image.new("RGB", target, fill)
    canvas.paste(image.resize((new_width, new_height), RESAMPLE),
                 ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def anyres_tiles(image: Image.Image, tile_size: int = 336, max_tiles: int = 4, fill: tuple[int, int, int] = (0, 0, 0),
                 min_side: int = DEFAULT_MIN_SIDE) -> SlicedImage:
    """Tile `image` as LLaVA-NeXT AnyRes does: a global view plus a grid of `tile_size` squares.

    `fill` is the padding colour (0-255 RGB; pass the encoder's mean colour so padding normalises
    to zero). The global view is the image fitted into a `tile_size` square and padded with `fill`
    (LLaVA-1.5's pad-to-square), not squashed as in LLaVA-NeXT, so no view distorts shapes.
    """
    _check_positive(tile_size=tile_size, max_tiles=max_tiles)
    _check_size(*image.size, min_side)
    image = image.convert("RGB")
    cols, rows = anyres_grid(*image.size, tile_size, max_tiles)
    canvas = _fit_and_pad(image, (cols * tile_size, rows * tile_size), fill)
    whole = _fit_and_pad(image, (tile_size, tile_size), fill)
    return SlicedImage(whole, _cut(canvas, (cols, rows)), (cols, rows))


# --- Token layout ------------------------------------------------------------------------------------


def layout_text(whole_tokens: int, slice_tokens: list[list[int]], image_token: str = IMAGE_MARKER,
                img: tuple[str, str] = ("<img>", "</img>"), slice: tuple[str, str] = ("<slice>", "</slice>"),
                row_sep: str = "\n") -> str:
    """The placeholder text for one sliced image, as MiniCPM-V 2.6 lays it out.

    `img[0]` + `image_token` * `whole_tokens` + `img[1]`, then, if there are slices, each slice as
    `slice[0]` + `image_token` * n + `slice[1]`, one row after another with `row_sep` between rows
    (not after the last one: MiniCPM-V joins the rows with "\\n"). `slice_tokens[r][c]` is the token
    count of the slice in row r, column c.
    """
    counts = [whole_tokens, *(n for row in slice_tokens for n in row)]
    if any(n < 0 for n in counts):
        raise ConfigError(f"image token counts must not be negative, got whole {whole_tokens}, slices {slice_tokens}")
    if any(not row for row in slice_tokens):
        raise ConfigError(f"every row of slice_tokens needs at least one slice, got {slice_tokens}")
    text = img[0] + image_token * whole_tokens + img[1]
    rows = ["".join(slice[0] + image_token * n + slice[1] for n in row) for row in slice_tokens]
    return text + row_sep.join(rows)


def crop_order(sliced: SlicedImage) -> list[Image.Image]:
    """The crops in the order their features fill `layout_text`'s placeholders: whole, then row-major slices."""
    return [sliced.whole, *sliced.slices]
