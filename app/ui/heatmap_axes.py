"""A heatmap image with what makes it readable: tick numbers on both axes, axis titles and a colour bar.

Drawn with PIL around app.lora_commands.heatmap_image (the CLI's PNG) rather than with matplotlib, which
sdlora does not depend on (only the bench extra does); a few lines of text and a gradient are all it takes.
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

from app.lora_commands import heatmap_image

MARGIN_LEFT, MARGIN_TOP, MARGIN_RIGHT, MARGIN_BOTTOM = 46, 30, 70, 12
BAR_WIDTH, BAR_GAP = 14, 14
MAX_TICKS = 8
INK, BACKGROUND = (55, 65, 81), (255, 255, 255)


def heatmap_with_axes(matrix: list[list[float]], cell: int, rows_title: str = "i", columns_title: str = "j"):
    """The cells of `matrix` (values in [0, 1]) `cell` px square, rows numbered 1..r down the left side,
    columns 1..r along the top, and a 0-to-1 colour bar on the right."""
    cells = heatmap_image(matrix, cell)
    rows, columns = len(matrix), len(matrix[0]) if matrix else 0
    width = MARGIN_LEFT + cells.width + BAR_GAP + BAR_WIDTH + MARGIN_RIGHT
    height = MARGIN_TOP + cells.height + MARGIN_BOTTOM
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    canvas.paste(cells, (MARGIN_LEFT, MARGIN_TOP))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for index in _ticks(rows):
        y = MARGIN_TOP + (index - 0.5) * cell
        draw.text((MARGIN_LEFT - 6, y), str(index), fill=INK, font=font, anchor="rm")
    for index in _ticks(columns):
        x = MARGIN_LEFT + (index - 0.5) * cell
        draw.text((x, MARGIN_TOP - 5), str(index), fill=INK, font=font, anchor="md")
    draw.text((4, MARGIN_TOP - 18), rows_title + " ↓", fill=INK, font=font, anchor="ld")
    draw.text((MARGIN_LEFT + cells.width, MARGIN_TOP - 18), columns_title + " →", fill=INK, font=font, anchor="rd")
    _colour_bar(canvas, draw, font, MARGIN_LEFT + cells.width + BAR_GAP, cells.height)
    return canvas


def _ticks(count: int) -> list[int]:
    """1, then every step-th index, always the last: at most about MAX_TICKS labels."""
    if count <= 0:
        return []
    step = max(1, math.ceil(count / MAX_TICKS))
    ticks = list(range(1, count + 1, step))
    return ticks if ticks[-1] == count else ticks + [count]


def _colour_bar(canvas, draw, font, left: int, height: int) -> None:
    steps = max(height, 2)
    gradient = heatmap_image([[1 - row / (steps - 1)] for row in range(steps)], 1).resize((BAR_WIDTH, height))
    canvas.paste(gradient, (left, MARGIN_TOP))
    for value in (1.0, 0.5, 0.0):
        y = MARGIN_TOP + (1 - value) * (height - 1)
        draw.text((left + BAR_WIDTH + 5, y), f"{value:g}", fill=INK, font=font, anchor="lm")
    draw.text((left + BAR_WIDTH + 5, MARGIN_TOP - 5), "phi", fill=INK, font=font, anchor="ld")
