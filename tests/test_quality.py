"""The style and content scores (trainer/demo/quality.py) measure what they claim, and the demo LoRA learns."""
import random
import re

import pytest
import torch
from PIL import Image, ImageDraw

from trainer.demo import demo_data
from trainer.demo.demo_data import HELD_OUT, PALETTE, PAPER, TRIGGER, demo_scenes
from trainer.demo.plain_scenes import COLOURS, make_plain_scene
from trainer.demo.quality import (
    content_score,
    find_object,
    held_out_prompts,
    style_features,
    style_reference,
    style_score,
    training_style,
)
from trainer.demo.shapes import SHAPES, SUPERSAMPLE, draw_shape

NAMED = re.compile(r"an? (\w+) (circle|square|triangle|diamond)")


def one_shape(shape: str, colour, background, styled: bool, rng: random.Random) -> Image.Image:
    """A 64 px image of one shape, plain (as the base model was trained) or in the demo style."""
    side = 64 * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    radius = rng.uniform(0.18, 0.3) * side
    centre = (rng.uniform(radius, side - radius * 1.2), rng.uniform(radius, side - radius * 1.2))
    if styled:
        demo_data._draw_dots(draw, side, side)
        demo_data._draw_shape(draw, shape, centre, radius, colour, outline=side // 40)
    else:
        draw_shape(draw, shape, centre, radius, colour)
    return canvas.resize((64, 64), Image.Resampling.LANCZOS)


@pytest.mark.parametrize("styled", [False, True], ids=["plain", "demo-style"])
def test_find_object_reads_shape_and_colour_of_rendered_shapes(styled):
    rng = random.Random(7)
    palette = PALETTE if styled else {name: COLOURS[name] for name in ("red", "blue", "green", "teal", "plum")}
    cases = [(shape, name) for shape in SHAPES for name in palette for _ in range(3)]
    read = []
    for shape, name in cases:
        background = PAPER if styled else (150, 150, 150)
        found = find_object(one_shape(shape, palette[name], background, styled, rng))
        read.append(found is not None and (found.shape, found.colour) == (shape, name))
    assert sum(read) / len(read) >= 0.95, f"{len(read) - sum(read)} of {len(read)} misread"


def test_find_object_reads_plain_scenes_with_gradients():
    scenes = [make_plain_scene(64, random.Random(f"t{index}")) for index in range(150)]
    single = [(image, NAMED.findall(caption)[0]) for image, caption in scenes if len(NAMED.findall(caption)) == 1]
    assert len(single) >= 50
    assert content_score([image for image, _ in single], [target for _, target in single]) >= 97


def test_content_gives_half_for_the_colour_and_half_for_the_shape():
    image = one_shape("circle", COLOURS["red"], (150, 150, 150), False, random.Random(1))
    assert content_score([image], [("red", "circle")]) == 100
    assert content_score([image], [("red", "square")]) == 50
    assert content_score([image], [("blue", "square")]) == 0


def test_an_empty_image_has_no_object_and_no_content():
    blank = Image.new("RGB", (64, 64), (150, 150, 150))
    assert find_object(blank) is None
    assert content_score([blank], [("red", "circle")]) == 0


def test_style_separates_the_demo_style_from_plain_scenes():
    plain = [make_plain_scene(64, random.Random(f"s{index}"))[0] for index in range(60)]
    assert style_score(plain) < 12
    assert training_style() > 85
    assert style_score(image for image, _ in demo_scenes(30, seed=9)) > 85  # other images, same style
    # each feature is a pixel fraction; the reference is the training images' mean
    cream, ink, palette = style_reference()
    assert 0.5 < cream < 0.9 and 0.02 < ink < 0.2 and palette > cream + ink
    assert style_features(Image.new("RGB", (64, 64), PAPER)).tolist() == [1.0, 0.0, 1.0]


def test_held_out_pairs_are_never_drawn_in_the_demo_dataset():
    drawn = {pair for _, caption in demo_scenes(300, seed=3) for pair in NAMED.findall(caption)}
    assert len(drawn) == len(PALETTE) * len(SHAPES) - len(HELD_OUT)
    assert not drawn & set(HELD_OUT)
    prompts, targets, seeds = held_out_prompts(seeds=2)
    assert prompts[0] == f"{TRIGGER}, a {HELD_OUT[0][0]} {HELD_OUT[0][1]}" and seeds[:2] == [0, 1]
    assert targets == [pair for pair in HELD_OUT for _ in range(2)]


@pytest.fixture(scope="module")
def demo_dataset(tmp_path_factory):
    from trainer.demo.demo_data import make_demo_dataset

    folder = tmp_path_factory.mktemp("demo-data")
    make_demo_dataset(folder)
    return folder


def demo_preset(dataset, output, *overrides):
    """The `demo` preset as shipped on `dataset`, without previews or intermediate checkpoints."""
    from trainer.config.presets import resolve_config

    return resolve_config("demo", [f"dataset.path={dataset}", f"output.dir={output}", "sample.every_steps=0",
                                   "sample.at_start=false", "save.every_steps=0", *overrides])


@pytest.fixture(scope="module")
def demo_run(demo_dataset, tmp_path_factory):
    """The `demo` preset as shipped (demo:shapes, its steps, rank, alpha and rate), on the demo dataset."""
    from trainer.run.loop import train

    return train(demo_preset(demo_dataset, tmp_path_factory.mktemp("demo-run")), progress=False)


def test_the_demo_lora_fits_the_style_images_better_than_the_base(demo_run):
    """Measured learning: the denoising loss on the demo images (same noise, same timesteps) drops."""
    import numpy as np

    from networks.lora_file import read_lora
    from networks.network import LoraNetwork
    from trainer.demo.quality import as_pixels
    from trainer.model.model_loading import load_model
    from trainer.objective.diffusion import training_target

    model = load_model("demo:shapes")
    images, captions = zip(*demo_scenes(12, seed=0))
    pixels = torch.tensor(np.stack([as_pixels(image) for image in images])).permute(0, 3, 1, 2) / 127.5 - 1
    ids = model.tokenizers[0](list(captions), padding="max_length", max_length=77, return_tensors="pt").input_ids

    @torch.no_grad()
    def loss() -> float:
        latents = model.vae.encode(pixels).latent_dist.mode() * model.vae.config.scaling_factor
        states = model.text_encoders[0](ids)[0]
        total = 0.0
        for t in (50, 200, 400, 999):
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
            steps = torch.full((len(latents),), t)
            noisy = model.noise_scheduler.add_noise(latents, noise, steps)
            target = training_target(model.noise_scheduler, latents, noise, steps, model.prediction_type)
            total += float(((model.unet(noisy, steps, states).sample - target) ** 2).mean())
        return total

    before = loss()
    LoraNetwork.from_state_dict("sd1", model.unet, model.text_encoders, read_lora(demo_run)[0]).attach().eval()
    assert loss() < 0.85 * before


@pytest.fixture(scope="module")
def demo_scores(demo_run):
    """Held-out scores of demo:shapes alone and with the demo LoRA (fixed seeds: DDIM, 2 seeds a prompt)."""
    from networks.lora_file import read_lora
    from networks.network import LoraNetwork
    from trainer.demo.quality import evaluate
    from trainer.model.model_loading import load_model
    from trainer.run.sampling import build_pipeline

    base = load_model("demo:shapes")
    pipeline = build_pipeline(base, "ddim")
    before = evaluate(pipeline, seeds=2)
    LoraNetwork.from_state_dict("sd1", base.unet, base.text_encoders, read_lora(demo_run)[0]).attach().eval()
    return before, evaluate(pipeline, seeds=2)


def test_the_demo_lora_moves_the_style_and_keeps_the_content(demo_scores):
    """What the demo preset reaches today (issue 11): the base draws the held-out pairs in its plain look,
    the LoRA moves well over half way to the training images' style and still draws the named pairs."""
    before, after = demo_scores
    assert before.content >= 70 and before.style < 25, before
    assert after.style >= before.style + 0.5 * (training_style() - before.style), (before, after)
    assert after.content >= before.content - 10, (before, after)


@pytest.fixture(scope="module")
def full_finetune_scores(demo_dataset, tmp_path_factory):
    """Held-out scores of demo:shapes with its whole UNet fine-tuned (no LoRA) on the demo run's data with the
    demo preset's steps, batch, seed and schedule, at docs/QUALITY.md's full fine-tune rate (AdamW 1e-4):
    the ceiling of what training on these images gets this base to draw (bench/full_finetune.py)."""
    from bench.full_finetune import FULL_LEARNING_RATE, FullFineTune
    from bench.quality import sdlora_pipeline
    from trainer.demo.quality import evaluate
    from trainer.model.model_loading import load_model

    cfg = demo_preset(demo_dataset, tmp_path_factory.mktemp("full-ft"), f"train.learning_rate={FULL_LEARNING_RATE}")
    contender = FullFineTune(cfg)
    contender.setup()
    batches = contender.batches()
    for _ in range(cfg.train.max_steps):
        contender.step(next(batches))
    return evaluate(sdlora_pipeline(contender, load_model("demo:shapes")), seeds=2)


def test_the_demo_lora_gets_90_percent_of_a_full_finetunes_style_gain(demo_scores, full_finetune_scores):
    """Issue 24: the yardstick is what training the whole UNet on the same images reaches on the same base
    (issue 11's 80% of the training images' style is out of reach of any training on this base, a full
    fine-tune included: docs/QUALITY.md). Same held-out prompts and seeds, same steps."""
    before, lora = demo_scores
    full = full_finetune_scores
    assert full.style > before.style + 10, (before, full)  # the full fine-tune learns the style
    assert lora.style - before.style >= 0.9 * (full.style - before.style), (before, lora, full)
    assert lora.content >= before.content - 10, (before, lora)
