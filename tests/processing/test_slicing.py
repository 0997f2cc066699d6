"""Image slicing: MiniCPM-V grids and sizes, AnyRes tiles, the token layout and the crop order."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmkit.errors import ConfigError, DataError
from vlmkit.processing.slicing import (
    anyres_grid,
    anyres_grids,
    anyres_tiles,
    best_size,
    crop_order,
    layout_text,
    minicpm_slices,
    refine_size,
    select_best_resolution,
    slice_grid,
)

PROPERTY = settings(max_examples=50, deadline=None)
LLAVA_NEXT_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
BOUNDARY_TOKENS = ("<img>", "</img>", "<slice>", "</slice>")


def _grid_image(cols: int, rows: int, cell: int) -> Image.Image:
    """An image whose cells each have their own colour, to see where every slice came from."""
    image = Image.new("RGB", (cols * cell, rows * cell))
    for row in range(rows):
        for col in range(cols):
            image.paste((40 * col, 40 * row, 200), (col * cell, row * cell, (col + 1) * cell, (row + 1) * cell))
    return image


def _candidates(width, height, slice_size, max_slices):
    """MiniCPM-V's candidate grids, written out independently of the module."""
    wanted = min(math.ceil(width * height / slice_size**2), max_slices)
    if wanted <= 1:
        return []
    grids = []
    for n in (wanted - 1, wanted, wanted + 1):
        if 1 < n <= max_slices:
            grids += [(cols, n // cols) for cols in range(1, n + 1) if n % cols == 0]
    return grids


# --- MiniCPM-V: fixed cases ------------------------------------------------------------------------


def test_square_image_three_times_the_slice_size_gives_a_3x3_grid_and_its_layout():
    sliced = minicpm_slices(Image.new("RGB", (1344, 1344)), slice_size=448, max_slices=9, multiple=14)
    assert sliced.grid == (3, 3)
    assert sliced.whole.size == (448, 448)
    assert [len(row) for row in sliced.rows] == [3, 3, 3]
    assert {crop.size for crop in sliced.slices} == {(448, 448)}
    assert len(crop_order(sliced)) == 10

    text = layout_text(64, [[64] * 3 for _ in range(3)])
    assert text.count("<image>") == 64 * 10
    counts = {token: text.count(token) for token in BOUNDARY_TOKENS}
    assert counts == {"<img>": 1, "</img>": 1, "<slice>": 9, "</slice>": 9}
    assert text.count("\n") == 2  # between the three rows, none after the last
    row = ("<slice>" + "<image>" * 64 + "</slice>") * 3
    assert text == "<img>" + "<image>" * 64 + "</img>" + "\n".join([row] * 3)


def test_image_of_one_slice_is_not_sliced():
    sliced = minicpm_slices(Image.new("RGB", (448, 448)), slice_size=448, max_slices=9, multiple=14)
    assert sliced.grid is None and sliced.rows == [] and sliced.whole.size == (448, 448)
    assert crop_order(sliced) == [sliced.whole]
    assert layout_text(64, []) == "<img>" + "<image>" * 64 + "</img>"


def test_small_unsliced_image_is_scaled_up_and_never_split_keeps_one_view():
    assert minicpm_slices(Image.new("RGB", (100, 100)), 448, 9, 14).whole.size == (448, 448)
    sliced = minicpm_slices(Image.new("RGB", (1344, 1344)), 448, 9, 14, never_split=True)
    assert sliced.grid is None and sliced.whole.size == (448, 448)


@pytest.mark.parametrize(("size", "grid"), [((2000, 500), (4, 1)), ((500, 2000), (1, 4)), ((1400, 700), (3, 2)),
                                            ((700, 1400), (2, 3)), ((3000, 300), (6, 1))])
def test_wide_images_get_wide_grids_and_tall_images_tall_ones(size, grid):
    assert slice_grid(*size, slice_size=448, max_slices=9) == grid


def test_slices_come_out_row_major_from_the_right_places():
    sliced = minicpm_slices(_grid_image(3, 2, 448), slice_size=448, max_slices=9, multiple=14)
    assert sliced.grid == (3, 2)
    for index, crop in enumerate(crop_order(sliced)[1:]):
        row, col = divmod(index, 3)
        assert crop.getpixel((crop.width // 2, crop.height // 2)) == (40 * col, 40 * row, 200)


def test_best_size_and_refine_size_by_hand():
    assert best_size(1344, 1344, 448, 14, allow_upscale=False) == (448, 448)
    assert best_size(100, 50, 448, 14, allow_upscale=False) == (98, 56)  # small: only rounded to patches
    assert best_size(100, 50, 448, 14, allow_upscale=True) == (630, 322)  # 632 x 316 rounded to 14s
    assert best_size(3, 3, 448, 14, allow_upscale=False) == (14, 14)  # at least one patch
    assert refine_size(1344, 1344, (3, 3), 448, 14, allow_upscale=True) == (1344, 1344)
    assert refine_size(2000, 500, (4, 1), 448, 14, allow_upscale=True) == (1792, 448)


# --- MiniCPM-V: properties -------------------------------------------------------------------------


@PROPERTY
@given(width=st.integers(1, 20_000), height=st.integers(1, 20_000), slice_size=st.integers(14, 1024),
       max_slices=st.integers(1, 16))
def test_chosen_grid_is_the_best_candidate(width, height, slice_size, max_slices):
    grid = slice_grid(width, height, slice_size, max_slices)
    candidates = _candidates(width, height, slice_size, max_slices)
    if not candidates:
        assert grid is None
        return
    assert grid in candidates and 1 < grid[0] * grid[1] <= max_slices

    def error(g):
        return abs(math.log(width / height) - math.log(g[0] / g[1]))

    assert error(grid) == min(error(g) for g in candidates)


@PROPERTY
@given(width=st.integers(4, 900), height=st.integers(4, 900), slice_size=st.sampled_from([28, 56, 112, 224]),
       multiple=st.sampled_from([7, 14]), max_slices=st.integers(1, 9))
def test_slices_are_equal_multiples_of_the_patch_and_never_too_many(width, height, slice_size, multiple, max_slices):
    sliced = minicpm_slices(Image.new("RGB", (width, height)), slice_size, max_slices, multiple)
    assert sliced.grid == slice_grid(width, height, slice_size, max_slices)
    assert sliced.whole.width % multiple == 0 and sliced.whole.height % multiple == 0
    assert len(sliced.slices) <= max_slices
    cols, rows = sliced.grid or (0, 0)
    assert len(sliced.rows) == rows and all(len(row) == cols for row in sliced.rows)
    assert len(crop_order(sliced)) == 1 + cols * rows
    assert len({crop.size for crop in sliced.slices}) <= 1
    for crop in sliced.slices:
        assert crop.width % multiple == 0 and crop.height % multiple == 0


@PROPERTY
@given(whole=st.integers(0, 100), slices=st.lists(st.lists(st.integers(0, 100), min_size=1, max_size=4), max_size=4))
def test_layout_token_counts_are_the_sums_of_the_inputs(whole, slices):
    text = layout_text(whole, slices)
    assert text.count("<image>") == whole + sum(map(sum, slices))
    assert text.count("<img>") == text.count("</img>") == 1
    assert text.count("<slice>") == text.count("</slice>") == sum(map(len, slices))
    assert text.count("\n") == max(len(slices) - 1, 0)


def test_layout_takes_other_tokens_and_separators():
    text = layout_text(1, [[2], [1]], image_token="<unk>", img=("<image>", "</image>"), row_sep="|")
    assert text == "<image><unk></image><slice><unk><unk></slice>|<slice><unk></slice>"


# --- LLaVA-NeXT AnyRes -----------------------------------------------------------------------------


def test_select_best_resolution_by_hand():
    # 800x600 fits 672x672 at 0.84 -> 672x504 = 338688 effective pixels, more than any other.
    assert select_best_resolution((800, 600), LLAVA_NEXT_PINPOINTS) == (672, 672)
    # 1000x200 in 1008x336: 1008x201 = 202608, capped at the original 200000; others fit far less.
    assert select_best_resolution((1000, 200), [(336, 336), (672, 336), (1008, 336)]) == (1008, 336)
    # A small image is all there in every candidate, so the least padding wins, in either order.
    assert select_best_resolution((100, 100), [(672, 672), (336, 336)]) == (336, 336)
    assert select_best_resolution((100, 100), [(336, 336), (672, 672)]) == (336, 336)
    # Same effective and wasted area: the first listed wins.
    assert select_best_resolution((500, 500), [(336, 672), (672, 336)]) == (336, 672)


def test_anyres_grids_and_fixed_cases():
    assert anyres_grids(4) == [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (2, 2), (1, 3), (1, 4)]
    assert anyres_grid(800, 600, 336, 4) == (2, 2)
    assert anyres_grid(1000, 200, 336, 4) == (3, 1)
    assert anyres_grid(200, 1000, 336, 4) == (1, 3)


def test_anyres_pads_with_the_fill_colour_and_keeps_the_image_centred():
    fill, red = (10, 20, 30), (255, 0, 0)
    sliced = anyres_tiles(Image.new("RGB", (1000, 200), red), tile_size=336, max_tiles=4, fill=fill)
    assert sliced.grid == (3, 1) and len(sliced.slices) == 3
    assert sliced.slices[0].getpixel((0, 0)) == fill  # 1008x202 image centred in 1008x336
    assert sliced.slices[0].getpixel((168, 168)) == red
    assert sliced.whole.size == (336, 336)
    assert sliced.whole.getpixel((0, 0)) == fill and sliced.whole.getpixel((168, 168)) == red


@PROPERTY
@given(width=st.integers(4, 1200), height=st.integers(4, 1200), tile_size=st.sampled_from([16, 32, 64]),
       max_tiles=st.integers(1, 9))
def test_anyres_tiles_are_exact_squares_and_never_too_many(width, height, tile_size, max_tiles):
    sliced = anyres_tiles(Image.new("RGB", (width, height)), tile_size, max_tiles)
    cols, rows = sliced.grid
    assert sliced.grid == anyres_grid(width, height, tile_size, max_tiles)
    assert len(sliced.slices) == cols * rows <= max_tiles
    assert {crop.size for crop in crop_order(sliced)} == {(tile_size, tile_size)}
    assert len(crop_order(sliced)) == 1 + cols * rows


# --- Bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(3, 500), (500, 2)])
def test_too_small_images_are_refused(size):
    with pytest.raises(DataError, match="at least 4 pixels"):
        minicpm_slices(Image.new("RGB", size), 448, 9, 14)
    with pytest.raises(DataError, match="at least 4 pixels"):
        anyres_tiles(Image.new("RGB", size), 336, 4)


def test_bad_sizes_and_settings_are_refused():
    with pytest.raises(DataError, match="0x10"):
        slice_grid(0, 10, 448, 9)
    with pytest.raises(DataError):
        anyres_grid(10, -1, 336, 4)
    with pytest.raises(ConfigError, match="max_slices must be at least 1, got 0"):
        slice_grid(1000, 1000, 448, 0)
    with pytest.raises(ConfigError, match="slice_size"):
        minicpm_slices(Image.new("RGB", (100, 100)), 0, 9, 14)
    with pytest.raises(ConfigError, match="multiple"):
        best_size(100, 100, 448, 0, allow_upscale=False)
    with pytest.raises(ConfigError, match="max_tiles"):
        anyres_tiles(Image.new("RGB", (100, 100)), 336, 0)
    with pytest.raises(ConfigError, match="at least one candidate"):
        select_best_resolution((100, 100), [])
    with pytest.raises(ConfigError, match="negative"):
        layout_text(-1, [])
    with pytest.raises(ConfigError, match="at least one slice"):
        layout_text(64, [[64], []])
