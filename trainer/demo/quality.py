"""Style and content scores: does a LoRA trained on the demo style draw in it, and still draw what it is told?

Both are deterministic measurements of 64 px images, hand-written because no library measures this
particular style (docs/QUALITY.md explains the choices):

- **style** (0-100): three pixel fractions of the demo style (trainer/demo/demo_data.py), each divided by its
  mean on the demo training images and capped at 1, then averaged: cream paper (PAPER or DOTS), navy ink
  (INK: outlines and shadows), and "in the style's palette" (paper, dots, ink or one of the four fills).
  The training images score about 100 by construction; plain scenes score near 0.
- **content** (0-100): the largest object that is neither background nor ink is found (background = a plane
  fitted to the border pixels, so gradients count as background); its median colour is named by the
  nearest named colour, its shape by its outline's geometry (fill of its bounding box; where its widest
  row lies). Half a point for the named colour, half for the named shape, averaged over images.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from PIL import Image

from trainer.demo.demo_data import DOTS, HELD_OUT, INK, PALETTE, PAPER, TRIGGER, demo_scenes
from trainer.demo.plain_scenes import COLOURS, article

SIZE = 64
CREAM_TOLERANCE = 30.0  # RGB distance: a pixel this close to PAPER or DOTS is cream paper
INK_TOLERANCE = 40.0
PALETTE_TOLERANCE = 30.0
OBJECT_CONTRAST = 60.0  # a pixel this far from the fitted background belongs to an object
MIN_OBJECT_PIXELS = 20  # of 64 x 64; anything smaller is noise, not a drawn shape
# The style's fills are shades of colour names the base model knows, so content reads the same names.
NAMED_COLOURS = [(name, np.array(rgb, dtype=np.float32)) for name, rgb in COLOURS.items()]
NAMED_COLOURS += [(name, np.array(rgb, dtype=np.float32)) for name, rgb in PALETTE.items()]
STYLE_COLOURS = np.array([PAPER, DOTS, INK, *PALETTE.values()], dtype=np.float32)


@dataclass(frozen=True)
class DrawnObject:
    colour: str
    shape: str
    pixels: int


def as_pixels(image: Image.Image) -> np.ndarray:
    """A float32 64x64x3 array: the short side scaled to 64 px, then centre-cropped, as training sees it."""
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        scale = SIZE / min(image.size)
        width, height = max(SIZE, round(image.width * scale)), max(SIZE, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.LANCZOS)
        left, top = (width - SIZE) // 2, (height - SIZE) // 2
        image = image.crop((left, top, left + SIZE, top + SIZE))
    return np.asarray(image, dtype=np.float32)


def _near(pixels: np.ndarray, colours, tolerance: float) -> np.ndarray:
    colours = np.asarray(colours, dtype=np.float32).reshape(-1, 3)
    distances = np.linalg.norm(pixels[..., None, :] - colours, axis=-1)
    return distances.min(axis=-1) < tolerance


def style_features(image: Image.Image) -> np.ndarray:
    """(cream, ink, palette): the fractions of pixels in the style's paper, ink and whole palette."""
    pixels = as_pixels(image)
    return np.array([
        _near(pixels, [PAPER, DOTS], CREAM_TOLERANCE).mean(),
        _near(pixels, [INK], INK_TOLERANCE).mean(),
        _near(pixels, STYLE_COLOURS, PALETTE_TOLERANCE).mean(),
    ])


@cache
def style_reference() -> tuple[float, float, float]:
    """The mean style features of the demo training images (make_demo_dataset's default 12, seed 0)."""
    features = np.mean([style_features(image) for image, _ in demo_scenes(12, seed=0)], axis=0)
    return tuple(float(value) for value in features)


def style_score(images) -> float:
    """0-100: how much the images look like the demo style (100 = as much as its training images)."""
    reference = np.array(style_reference())
    per_image = [np.minimum(1.0, style_features(image) / reference).mean() for image in images]
    return float(100.0 * np.mean(per_image))


def content_score(images, targets) -> float:
    """0-100: for each image and its (colour, shape) target, half for the colour drawn, half for the shape."""
    points = []
    for image, (colour, shape) in zip(images, targets, strict=True):
        drawn = find_object(image)
        points.append(0.0 if drawn is None else 0.5 * (drawn.colour == colour) + 0.5 * (drawn.shape == shape))
    return float(100.0 * np.mean(points))


def find_object(image: Image.Image) -> DrawnObject | None:
    """The largest drawn object's colour and shape, or None when nothing stands out from the background."""
    pixels = as_pixels(image)
    foreground = np.linalg.norm(pixels - _background_plane(pixels), axis=-1) > OBJECT_CONTRAST
    foreground &= ~_near(pixels, [INK], INK_TOLERANCE)  # outlines and shadows are style, not the object
    component = _largest_component(foreground)
    if component.sum() < MIN_OBJECT_PIXELS:
        return None
    inner = _eroded(component)  # without the 1 px fringe where the fill blends into outline or background
    if inner.sum() >= MIN_OBJECT_PIXELS // 2:
        component = _largest_component(inner)
    return DrawnObject(_colour_name(pixels, component), _shape_name(component), int(component.sum()))


def _background_plane(pixels: np.ndarray) -> np.ndarray:
    """A per-channel plane a + b*x + c*y fitted to the border pixels: plain and gradient backgrounds."""
    size = pixels.shape[0]
    ys, xs = np.mgrid[0:size, 0:size]
    border = np.zeros((size, size), dtype=bool)
    border[[0, 1, -2, -1], :] = True
    border[:, [0, 1, -2, -1]] = True
    design = np.stack([np.ones(border.sum()), xs[border], ys[border]], axis=1)
    values = pixels[border]
    coefficients, *_ = np.linalg.lstsq(design, values, rcond=None)
    # Refit without the border pixels that a shape touching the edge covers.
    keep = np.linalg.norm(values - design @ coefficients, axis=-1) < OBJECT_CONTRAST / 2
    if keep.sum() >= design.shape[0] // 3:
        coefficients, *_ = np.linalg.lstsq(design[keep], values[keep], rcond=None)
    grid = np.stack([np.ones(size * size), xs.ravel(), ys.ravel()], axis=1)
    return (grid @ coefficients).reshape(size, size, 3)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask` (a breadth-first fill: numpy has no labelling of its own)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start], queue, size = label, deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


def _eroded(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _colour_name(pixels: np.ndarray, component: np.ndarray) -> str:
    """The nearest named colour to the median of the object's pixels."""
    median = np.median(pixels[component], axis=0)
    return min(NAMED_COLOURS, key=lambda named: float(np.linalg.norm(named[1] - median)))[0]


def _shape_name(component: np.ndarray) -> str:
    """Square fills its bounding box, a circle pi/4 of it, triangle and diamond half; a triangle (pointing
    up) is widest at the bottom, a diamond in the middle."""
    rows, columns = np.nonzero(component)
    height, width = rows.max() - rows.min() + 1, columns.max() - columns.min() + 1
    fill = component.sum() / (height * width)
    if fill > 0.89:
        return "square"
    if fill > 0.64:
        return "circle"
    widths = component[rows.min():rows.max() + 1].sum(axis=1)
    widest = np.nonzero(widths >= 0.9 * widths.max())[0].mean() / max(1, height - 1)
    return "triangle" if widest > 0.72 else "diamond"


def held_out_prompts(seeds: int = 4, trigger: bool = True) -> tuple[list[str], list[tuple[str, str]], list[int]]:
    """Prompts for the colour/shape pairs the demo dataset never draws (demo_data.HELD_OUT), each at
    `seeds` seeds: (prompts, (colour, shape) targets, seeds)."""
    prompts, targets, seed_list = [], [], []
    for colour, shape in HELD_OUT:
        text = f"{article(colour)} {colour} {shape}"
        for seed in range(seeds):
            prompts.append(f"{TRIGGER}, {text}" if trigger else text)
            targets.append((colour, shape))
            seed_list.append(seed)
    return prompts, targets, seed_list


@dataclass(frozen=True)
class Scores:
    style: float
    content: float


@torch.no_grad()
def render_held_out(pipeline, seeds: int = 4, steps: int = 20, guidance: float = 5.0,
                    trigger: bool = True) -> tuple[list[Image.Image], list[tuple[str, str]]]:
    """The held-out prompts drawn by `pipeline` (its own sampler) at 64 px, each seed its own generator."""
    prompts, targets, seed_list = held_out_prompts(seeds, trigger)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seed_list]
    with torch.random.fork_rng():
        images = pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                          generator=generators).images
    return images, targets


def evaluate(pipeline, seeds: int = 4, steps: int = 20, guidance: float = 5.0, trigger: bool = True) -> Scores:
    """Style and content of `pipeline` (a base model, with or without a LoRA attached) on held-out prompts;
    without the trigger word they ask for the base's own plain scenes, which a LoRA should leave alone."""
    images, targets = render_held_out(pipeline, seeds, steps, guidance, trigger)
    return Scores(style_score(images), content_score(images, targets))


def image_change(before, after) -> float:
    """0-100: the mean absolute pixel difference between two lists of images drawn from the same prompts and
    seeds (say, the base model's and a LoRA's), in percent of the full 0-255 range."""
    pairs = list(zip(before, after, strict=True))
    return float(100.0 * np.mean([np.abs(as_pixels(a) - as_pixels(b)).mean() / 255.0 for a, b in pairs]))


def training_style() -> float:
    """The style score of the demo training images themselves: the top of the scale a LoRA aims for."""
    return style_score(image for image, _ in demo_scenes(12, seed=0))
