"""Image grids with a title over each tile (class models, saliency pairs), drawn with
Pillow into one uint8 array, so the same tiles give the same bytes."""
import math

import numpy as np

TITLE_HEIGHT = 14
GAP = 4


def as_rgb(image):
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> (H, W, 3)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def heatmap(values):
    """Float (H, W) in [0, 1] -> uint8 (H, W, 3) through matplotlib's 'inferno' colour map."""
    from matplotlib import colormaps

    rgba = colormaps["inferno"](np.clip(values, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def titled_grid(tiles, titles, columns=None, min_tile=96):
    """One uint8 (H, W, 3) picture: ``tiles`` in rows of ``columns``, each under its title.

    Tiles are enlarged by a whole factor (nearest neighbour, the pixels stay
    visible) until at least ``min_tile`` pixels wide; titles are cut to fit.
    """
    from PIL import Image, ImageDraw

    tiles = [as_rgb(tile) for tile in tiles]
    if not tiles:
        raise ValueError("a grid needs at least one tile")
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    factor = max(1, math.ceil(min_tile / width))
    cell_h, cell_w = height * factor + TITLE_HEIGHT, width * factor
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    canvas = Image.new("RGB", (columns * (cell_w + GAP) + GAP, rows * (cell_h + GAP) + GAP), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index, (tile, title) in enumerate(zip(tiles, titles)):
        r, c = divmod(index, columns)
        left, top = GAP + c * (cell_w + GAP), GAP + r * (cell_h + GAP)
        big = np.kron(tile, np.ones((factor, factor, 1), np.uint8))
        canvas.paste(Image.fromarray(big), (left, top + TITLE_HEIGHT))
        draw.text((left + 1, top + 1), _fit(draw, str(title), cell_w - 2), fill=(0, 0, 0))
    return np.asarray(canvas)


def _fit(draw, text, width):
    while text and draw.textlength(text) > width:
        text = text[:-4] + "..." if len(text) > 4 else ""
    return text
