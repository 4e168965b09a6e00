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

from networks.atomic import atomic_write

SAMPLERS = {"euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler,
            "dpmpp_2m": DPMSolverMultistepScheduler}


def build_pipeline(model, sampler: str = "euler_a"):
    """A pipeline sharing `model`'s modules (no copy), with the chosen sampler."""
    pipeline = model.pipeline()
    pipeline.scheduler = SAMPLERS[sampler].from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def prompt_kwargs(pipeline, prompt, family=None, clip_skip: int = 1, chunks: int = 1) -> dict:
    """The pipeline's text arguments for one sample prompt, read as training reads captions: from the
    text-encoder layer `clip_skip` (A1111/kohya numbering), in `chunks` 75-token windows."""
    kwargs = dict(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt or None)
    if clip_skip == 1 and chunks == 1:
        return kwargs
    if family.is_sdxl and chunks == 1:
        return dict(kwargs, clip_skip=clip_skip - 1)  # diffusers counts the layers skipped past its default
    # Otherwise encode as training does and pass the states: diffusers cuts prompts at 77 tokens, and its
    # SD1/SD2 clip_skip path reads text_encoder.text_model.final_layer_norm, which transformers 5's
    # CLIPTextModel no longer has.
    encoders = [getattr(pipeline, attr) for attr in family.text_encoder_attrs]
    tokenizers = [getattr(pipeline, attr) for attr in family.tokenizer_attrs]
    embeds = family.encode_prompt(encoders, tokenizers, [prompt.prompt, prompt.negative_prompt or ""],
                                  clip_skip, chunks)
    states, pooled = embeds.encoder_hidden_states, embeds.pooled
    if pooled is None:
        return dict(prompt_embeds=states[:1], negative_prompt_embeds=states[1:])
    negative, negative_pooled = states[1:], pooled[1:]
    if not prompt.negative_prompt and pipeline.config.get("force_zeros_for_empty_prompt", False):
        negative, negative_pooled = torch.zeros_like(negative), torch.zeros_like(negative_pooled)  # as SDXL does
    return dict(prompt_embeds=states[:1], negative_prompt_embeds=negative, pooled_prompt_embeds=pooled[:1],
                negative_pooled_prompt_embeds=negative_pooled)


@torch.no_grad()
def render_samples(pipeline, prompts, default_size: tuple[int, int], folder: Path, step: int, family=None,
                   clip_skip: int = 1, chunks: int = 1) -> list[Path]:
    """One PNG per prompt; the global RNG is left untouched so sampling never changes training."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    device = pipeline.unet.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for index, prompt in enumerate(prompts):
            width, height = prompt.width or default_size[0], prompt.height or default_size[1]
            generator = torch.Generator(device="cpu").manual_seed(prompt.seed)
            image = pipeline(**prompt_kwargs(pipeline, prompt, family, clip_skip, chunks), num_inference_steps=prompt.steps,
                             guidance_scale=prompt.cfg, width=width, height=height, generator=generator).images[0]
            path = folder / f"step-{step:06d}-p{index}.png"
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write(path, lambda tmp, data=buffer.getvalue(): Path(tmp).write_bytes(data))
            paths.append(path)
    return paths
