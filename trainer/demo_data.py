"""A small generated style dataset, so a first run (and every test) needs no images from anywhere.

The "style" is deliberately easy to recognise in samples: flat shapes in a fixed four-colour palette,
thick navy outlines and a hard offset shadow on a cream, dotted background. Captions name the shapes
and lead with the trigger word, as people caption their own style datasets.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from networks.errors import SdloraError

TRIGGER = "sdlorastyle"
PALETTE = {"coral": (238, 108, 77), "teal": (42, 157, 143), "mustard": (233, 196, 106), "plum": (131, 56, 117)}
INK = (29, 53, 87)  # outlines and shadows
PAPER = (250, 243, 221)
DOTS = (232, 221, 190)
SHAPES = ("circle", "square", "triangle", "diamond")
# (width, height) ratios cycled so that every dataset of 3+ images has square, portrait and landscape.
ASPECTS = ((1, 1), (3, 4), (4, 3), (2, 3), (3, 2), (1, 2), (2, 1))
SUPERSAMPLE = 4  # draw large, then downsample: smooth edges without hand-written antialiasing


def make_demo_dataset(directory: Path, count: int = 12, seed: int = 0) -> list[Path]:
    """Write `count` PNGs with .txt captions into `directory`; the same seed writes the same files."""
    if count < 1:
        raise SdloraError(f"--count is {count}; ask for at least 1 demo image.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        image, caption = _draw_scene(_scene_size(index, rng), rng)
        path = directory / f"demo_{index:03d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def _scene_size(index: int, rng: random.Random) -> tuple[int, int]:
    ratio_w, ratio_h = ASPECTS[index % len(ASPECTS)]
    long_side = rng.choice((128, 160, 192, 224, 256))
    short_side = max(64, round(long_side * min(ratio_w, ratio_h) / max(ratio_w, ratio_h) / 8) * 8)
    return (long_side, short_side) if ratio_w >= ratio_h else (short_side, long_side)


def _draw_scene(size: tuple[int, int], rng: random.Random) -> tuple[Image.Image, str]:
    width, height = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    canvas = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(canvas)
    _draw_dots(draw, width, height)
    described = []
    for _ in range(rng.randint(1, 3)):
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(PALETTE))
        radius = rng.uniform(0.15, 0.3) * min(width, height)
        centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
        _draw_shape(draw, shape, centre, radius, PALETTE[colour], outline=max(2, round(min(width, height) / 40)))
        described.append(f"a {colour} {shape}")
    caption = ", ".join([TRIGGER, " and ".join(described), "flat colours, bold navy outlines, cream background"])
    return canvas.resize(size, Image.Resampling.LANCZOS), caption


def _draw_dots(draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    spacing = 16 * SUPERSAMPLE
    for y in range(spacing // 2, height, spacing):
        for x in range(spacing // 2, width, spacing):
            draw.circle((x, y), SUPERSAMPLE * 1.5, fill=DOTS)


def _draw_shape(draw, shape: str, centre, radius: float, fill, outline: int) -> None:
    shadow = (centre[0] + outline * 2, centre[1] + outline * 2)
    for position, colour in ((shadow, INK), (centre, fill)):
        x, y = position
        if shape == "circle":
            draw.circle((x, y), radius, fill=colour, outline=INK, width=outline)
        elif shape == "square":
            draw.rectangle((x - radius, y - radius, x + radius, y + radius), fill=colour, outline=INK, width=outline)
        else:
            sides, rotation = (3, 0) if shape == "triangle" else (4, 45)
            draw.regular_polygon((x, y, radius), sides, rotation=rotation, fill=colour, outline=INK, width=outline)
