"""Flat shapes drawn with PIL: the one drawing routine of the demo style dataset and the plain scenes the
demo base model was pretrained on, so both speak of the same four shapes drawn the same way."""
from __future__ import annotations

from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
SUPERSAMPLE = 4  # draw large, then downsample: smooth edges without hand-written antialiasing


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre, radius: float, fill, outline=None,
               width: int = 0) -> None:
    """One shape of `radius` around `centre`; triangles point up, diamonds are squares turned 45 degrees."""
    x, y = centre
    if shape == "circle":
        draw.circle((x, y), radius, fill=fill, outline=outline, width=width)
    elif shape == "square":
        draw.rectangle((x - radius, y - radius, x + radius, y + radius), fill=fill, outline=outline, width=width)
    else:
        sides, rotation = (3, 0) if shape == "triangle" else (4, 45)
        draw.regular_polygon((x, y, radius), sides, rotation=rotation, fill=fill, outline=outline, width=width)
