"""Plain scenes: what the demo base model (demo:shapes) was pretrained on, and so what it draws unprompted.

Flat shapes of many colours on plain or two-colour gradient backgrounds, no outlines, no shadows, no
texture, captioned as "a red circle and a blue square on a grey background". Deliberately NOT the demo
style (trainer/demo_data.py: cream dotted paper, navy outlines and shadows, a four-colour palette), so a
LoRA trained on the demo style has something visible to learn. The palette's colour names (coral, teal,
mustard, plum) are among the colours here, in their everyday shades, so the base model can draw what a
style prompt names.

`codec_extras=True` adds outlines, offset shadows and dot grids in random colours, and makes half of the
backgrounds and fills any colour at all: the VAE (a general image codec, as SD's is) learns to reproduce
such details and colours, while the UNet and text encoder never see them.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

from trainer.demo.shapes import SHAPES, SUPERSAMPLE, draw_shape

# Everyday shades, none of them the style's cream paper or navy ink; each name far enough from the others that a colour read back from an image names one.
COLOURS = {
    "red": (214, 39, 40), "orange": (245, 135, 25), "yellow": (250, 228, 45), "green": (44, 160, 44),
    "blue": (31, 90, 220), "purple": (118, 60, 190), "pink": (240, 120, 190), "brown": (120, 72, 35),
    "black": (25, 25, 25), "grey": (128, 128, 128), "coral": (250, 115, 85), "teal": (0, 135, 130),
    "mustard": (215, 170, 55), "plum": (135, 50, 110),
}
BACKGROUNDS = {
    "grey": (150, 150, 150), "light grey": (205, 205, 205), "black": (30, 30, 30),
    "light blue": (170, 205, 240), "light green": (185, 230, 180), "pink": (245, 190, 210),
    "dark green": (30, 80, 50), "lavender": (205, 195, 235), "dark red": (100, 25, 30), "yellow": (250, 235, 120),
}
JITTER = 12  # per channel, so a colour name stands for a small range of shades, not one RGB value
MIN_CONTRAST = 90  # RGB distance between a shape and its background


def make_plain_scene(size: int, rng: random.Random, codec_extras: bool = False) -> tuple[Image.Image, str]:
    """One square scene of `size` px and its caption, drawn from `rng` alone (same seed, same scene)."""
    side = size * SUPERSAMPLE
    canvas, background_words, backdrop = _background(side, rng)
    if codec_extras and rng.random() < 0.5:  # any colour at all, so the codec has seen every colour
        backdrop = _random_rgb(rng)
        canvas = Image.new("RGB", (side, side), backdrop)
    draw = ImageDraw.Draw(canvas)
    if codec_extras and rng.random() < 0.4:
        _dot_grid(draw, side, rng)
    described = []
    for _ in range(rng.choices((1, 2, 3), weights=(5, 3, 2))[0]):
        shape, name = rng.choice(SHAPES), _contrasting_colour(backdrop, rng)
        radius = rng.uniform(0.15, 0.3) * side
        centre = (rng.uniform(radius, side - radius), rng.uniform(radius, side - radius))
        fill = _random_rgb(rng) if codec_extras and rng.random() < 0.5 else _jittered(COLOURS[name], rng)
        if codec_extras and rng.random() < 0.5:
            _outlined(draw, shape, centre, radius, fill, rng)
        else:
            draw_shape(draw, shape, centre, radius, fill)
        described.append(f"{article(name)} {name} {shape}")
    caption = " and ".join(described)
    if rng.random() < 0.6:
        caption += f" on {background_words}"
    return canvas.resize((size, size), Image.Resampling.LANCZOS), caption


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _jittered(rgb, rng: random.Random) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in rgb)


def _background(side: int, rng: random.Random) -> tuple[Image.Image, str, tuple]:
    """A plain colour, or a vertical/horizontal gradient between two; returns its words and mean colour."""
    first = rng.choice(sorted(BACKGROUNDS))
    top = np.array(_jittered(BACKGROUNDS[first], rng), dtype=np.float32)
    if rng.random() < 0.7:
        image = Image.new("RGB", (side, side), tuple(int(c) for c in top))
        return image, f"{article(first)} {first} background", tuple(top)
    second = rng.choice([name for name in sorted(BACKGROUNDS) if name != first])
    bottom = np.array(_jittered(BACKGROUNDS[second], rng), dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top + (bottom - top) * ramp, (side, side, 3))
    if rng.random() < 0.5:
        pixels = pixels.transpose(1, 0, 2)
    image = Image.fromarray(np.ascontiguousarray(pixels).round().astype(np.uint8))
    return image, f"{article(first)} {first} to {second} gradient background", tuple((top + bottom) / 2)


def _contrasting_colour(backdrop, rng: random.Random) -> str:
    names = [n for n in sorted(COLOURS) if _distance(COLOURS[n], backdrop) >= MIN_CONTRAST]
    return rng.choice(names)


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float32)))


def _random_rgb(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))


def _outlined(draw, shape: str, centre, radius: float, fill, rng: random.Random) -> None:
    """Codec practice only: an outline (and sometimes an offset shadow) in a random colour and width."""
    ink, width = _random_rgb(rng), rng.randint(1, 3) * SUPERSAMPLE
    if rng.random() < 0.5:
        offset = width * 2
        draw_shape(draw, shape, (centre[0] + offset, centre[1] + offset), radius, ink, outline=ink, width=width)
    draw_shape(draw, shape, centre, radius, fill, outline=ink, width=width)


def _dot_grid(draw, side: int, rng: random.Random) -> None:
    """Codec practice only: a grid of small dots in a random colour, spacing and size."""
    spacing = rng.choice((8, 12, 16)) * SUPERSAMPLE
    radius, colour = rng.uniform(1.0, 2.0) * SUPERSAMPLE, _random_rgb(rng)
    for y in range(spacing // 2, side, spacing):
        for x in range(spacing // 2, side, spacing):
            draw.circle((x, y), radius, fill=colour)


def make_illustration(size: int, rng: random.Random) -> Image.Image:
    """Codec practice only (the VAE's --illustrations share, bench/pretrain_demo.py): an illustration in random
    colours, drawn large and scaled down as a dataset's images are: light paper with a faint dot grid, and
    shapes with a thin dark outline and an offset shadow in the same ink. Its structure is what illustrated
    styles share; its colours are random, so it teaches the codec thin lines and faint texture, not one style."""
    scale = rng.choice((1, 2, 3, 4)) * SUPERSAMPLE
    side = size * scale
    paper = tuple(rng.randint(170, 255) for _ in range(3))
    canvas = Image.new("RGB", (side, side), paper)
    draw = ImageDraw.Draw(canvas)
    spacing = round(rng.uniform(4, 8) * scale)
    dots = tuple(max(0, c - rng.randint(10, 35)) for c in paper)
    for y in range(spacing // 2, side, spacing):
        for x in range(spacing // 2, side, spacing):
            draw.circle((x, y), rng.uniform(0.3, 0.8) * scale, fill=dots)
    ink = tuple(rng.randint(0, 110) for _ in range(3))
    for _ in range(rng.choices((1, 2, 3), weights=(4, 3, 3))[0]):
        shape, radius = rng.choice(SHAPES), rng.uniform(0.15, 0.3) * side
        centre = (rng.uniform(radius, side - radius), rng.uniform(radius, side - radius))
        width = max(1, round(rng.uniform(1.0, 2.2) * scale))
        shadow = (centre[0] + 2 * width, centre[1] + 2 * width)
        draw_shape(draw, shape, shadow, radius, ink, outline=ink, width=width)
        draw_shape(draw, shape, centre, radius, _random_rgb(rng), outline=ink, width=width)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)
