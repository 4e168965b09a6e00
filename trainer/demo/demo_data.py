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
from trainer.demo.shapes import SHAPES, SUPERSAMPLE, draw_shape

TRIGGER = "sdlorastyle"
PALETTE = {"coral": (238, 108, 77), "teal": (42, 157, 143), "mustard": (233, 196, 106), "plum": (131, 56, 117)}
INK = (29, 53, 87)  # outlines and shadows
PAPER = (250, 243, 221)
DOTS = (232, 221, 190)
# Never drawn, so the quality score can ask for colour/shape pairs the LoRA never saw (a Latin square:
# each colour and each shape is held out once).
HELD_OUT = (("teal", "triangle"), ("coral", "diamond"), ("mustard", "square"), ("plum", "circle"))
# (width, height) ratios cycled so that every dataset of 3+ images has square, portrait and landscape.
ASPECTS = ((1, 1), (3, 4), (4, 3), (2, 3), (3, 2), (1, 2), (2, 1))


def make_demo_dataset(directory: Path, count: int = 12, seed: int = 0) -> list[Path]:
    """Write `count` PNGs with .txt captions into `directory`; the same seed writes the same files."""
    if count < 1:
        raise SdloraError(f"--count is {count}; ask for at least 1 demo image.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, caption) in enumerate(demo_scenes(count, seed)):
        path = directory / f"demo_{index:03d}.png"
        image.save(path)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def demo_scenes(count: int, seed: int = 0):
    """The (image, caption) pairs make_demo_dataset writes, in memory."""
    rng = random.Random(seed)
    for index in range(count):
        yield _draw_scene(_scene_size(index, rng), rng)


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
        shape, colour = _shape_and_colour(rng)
        radius = rng.uniform(0.15, 0.3) * min(width, height)
        centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
        _draw_shape(draw, shape, centre, radius, PALETTE[colour], outline=max(2, round(min(width, height) / 40)))
        described.append(f"a {colour} {shape}")
    caption = ", ".join([TRIGGER, " and ".join(described), "flat colours, bold navy outlines, cream background"])
    return canvas.resize(size, Image.Resampling.LANCZOS), caption


def _shape_and_colour(rng: random.Random) -> tuple[str, str]:
    while True:
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(PALETTE))
        if (colour, shape) not in HELD_OUT:
            return shape, colour


def _draw_dots(draw: ImageDraw.ImageDraw, width: int, height: int) -> None:
    spacing = 16 * SUPERSAMPLE
    for y in range(spacing // 2, height, spacing):
        for x in range(spacing // 2, width, spacing):
            draw.circle((x, y), SUPERSAMPLE * 1.5, fill=DOTS)


def _draw_shape(draw, shape: str, centre, radius: float, fill, outline: int) -> None:
    """The style's shape: a hard navy shadow offset down-right, then the shape in navy outline."""
    shadow = (centre[0] + outline * 2, centre[1] + outline * 2)
    for position, colour in ((shadow, INK), (centre, fill)):
        draw_shape(draw, shape, position, radius, colour, outline=INK, width=outline)
