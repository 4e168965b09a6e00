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
def render_samples(pipeline, prompts, default_size: tuple[int, int], folder: Path, step: int) -> list[Path]:
    """One PNG per prompt; the global RNG is left untouched so sampling never changes training."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    device = pipeline.unet.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for index, prompt in enumerate(prompts):
            width, height = prompt.width or default_size[0], prompt.height or default_size[1]
            generator = torch.Generator(device="cpu").manual_seed(prompt.seed)
            image = pipeline(prompt.prompt, negative_prompt=prompt.negative_prompt or None,
                             num_inference_steps=prompt.steps, guidance_scale=prompt.cfg, width=width,
                             height=height, generator=generator).images[0]
            path = folder / f"step-{step:06d}-p{index}.png"
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write(path, lambda tmp, data=buffer.getvalue(): Path(tmp).write_bytes(data))
            paths.append(path)
    return paths
