"""Preview images during training, from a diffusers pipeline built on the components already in memory
(the UNet carries the attached LoRA, so the samples show what the adapter does right now)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from networks.lora_file import atomic_write

SAMPLERS = {"euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler,
            "dpmpp_2m": DPMSolverMultistepScheduler}


def build_pipeline(model, sampler: str = "euler_a"):
    """A pipeline sharing `model`'s modules (no copy), with the chosen sampler."""
    pipeline = model.pipeline()
    pipeline.scheduler = SAMPLERS[sampler].from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def prompt_kwargs(pipeline, prompt, family=None, clip_skip: int = 1) -> dict:
    """The pipeline's text arguments for one sample prompt, read from the text-encoder layer `clip_skip`
    (A1111/kohya numbering) as training reads captions."""
    kwargs = dict(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt or None)
    if clip_skip == 1:
        return kwargs
    if family.is_sdxl:
        return dict(kwargs, clip_skip=clip_skip - 1)  # diffusers counts the layers skipped past its default
    # SD1/SD2: diffusers' own clip_skip path reads text_encoder.text_model.final_layer_norm, which
    # transformers 5's CLIPTextModel no longer has; encode as training does and pass the states.
    states = family.encode_prompt([pipeline.text_encoder], [pipeline.tokenizer],
                                  [prompt.prompt, prompt.negative_prompt], clip_skip=clip_skip).encoder_hidden_states
    return dict(prompt_embeds=states[:1], negative_prompt_embeds=states[1:])


@torch.no_grad()
def render_samples(pipeline, prompts, default_size: tuple[int, int], folder: Path, step: int, family=None,
                   clip_skip: int = 1) -> list[Path]:
    """One PNG per prompt; the global RNG is left untouched so sampling never changes training."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    device = pipeline.unet.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for index, prompt in enumerate(prompts):
            width, height = prompt.width or default_size[0], prompt.height or default_size[1]
            generator = torch.Generator(device="cpu").manual_seed(prompt.seed)
            image = pipeline(**prompt_kwargs(pipeline, prompt, family, clip_skip), num_inference_steps=prompt.steps,
                             guidance_scale=prompt.cfg, width=width, height=height, generator=generator).images[0]
            path = folder / f"step-{step:06d}-p{index}.png"
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write(path, lambda tmp, data=buffer.getvalue(): Path(tmp).write_bytes(data))
            paths.append(path)
    return paths
