"""GPU memory and time per step, from the model's parameter counts and the config (an uncalibrated formula,
docs/PREFLIGHT.md), and what the run costs on this machine."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from networks.errors import SdloraError
from networks.network import count_adapter_parameters
from trainer.config import TrainConfig
from trainer.model.facts import SHIPPED_CONFIGS
from trainer.model.family import FAMILIES, get_family
from trainer.model.model_loading import text_encoder_classes
from trainer.preflight.context import CheckContext
from trainer.preflight.learning_rates import OPTIMIZER_FACTS

# The constants of the estimate; docs/PREFLIGHT.md explains each. None is calibrated on a GPU yet.
WEIGHT_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
# Activation memory per image per pixel kept for the backward pass, at half precision, no checkpointing.
ACTIVATION_BYTES_PER_PIXEL = {"sd1": 10_000, "sd2": 10_000, "sdxl": 18_000}
CHECKPOINTING_ACTIVATIONS = 0.25  # gradient checkpointing keeps about a quarter of them
CHECKPOINTING_COMPUTE = 4 / 3  # ... at the price of one more forward pass
OVERHEAD_BYTES = 0.8e9  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
SD15_FLOP_PER_IMAGE = 1.73e12  # one training step (forward + backward) of the SD1.5 UNet at 512 x 512
FLOP_PER_PIXEL_FACTOR = {"sd1": 1.0, "sd2": 1.0, "sdxl": 2.6}  # relative to SD1.5, per pixel
ASSUMED_THROUGHPUT = {"half": 20e12, "fp32": 6e12}  # FLOP/s a 24 GB consumer GPU sustains on this work


@dataclass(frozen=True)
class Estimate:
    family: str
    resolution: int
    batch_size: int
    precision: str
    gradient_checkpointing: bool
    parameters: dict  # unet, text_encoders, vae, adapter
    memory_bytes: dict  # weights, vae, adapter, activations, overhead, total
    seconds_per_step: float
    calibrated: bool = False

    def words(self) -> str:
        gb = {k: v / 1e9 for k, v in self.memory_bytes.items()}
        return (f"Estimated GPU memory {gb['total']:.1f} GB (model weights {gb['weights'] + gb['vae']:.1f}, "
                f"adapter and optimizer {gb['adapter']:.2f}, activations {gb['activations']:.1f}, overhead "
                f"{gb['overhead']:.1f}) and {self.seconds_per_step:.2f} s per step for {self.family} at "
                f"{self.resolution} px, batch {self.batch_size}, {self.precision}"
                f"{', gradient checkpointing' if self.gradient_checkpointing else ''}; uncalibrated, expect "
                "+-50% (docs/PREFLIGHT.md).")


@lru_cache(maxsize=4)
def _meta_models(config_name: str):
    """The real model of a shipped config, built on the meta device: shapes without memory."""
    folder = SHIPPED_CONFIGS / config_name
    family = next(f for f in FAMILIES.values() if config_name in (f.shipped_config_name("epsilon"),
                                                                  f.shipped_config_name("v_prediction")))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [cls(cls.config_class.from_pretrained(folder / attr))
                    for cls, attr in zip(text_encoder_classes(folder, family), family.text_encoder_attrs)]
    return unet, encoders, vae


def model_parameters(family: str, prediction_type: str = "epsilon") -> dict[str, int]:
    """Parameter counts of the family's real UNet, text encoders and VAE (from the shipped configs)."""
    unet, encoders, vae = _meta_models(get_family(family).shipped_config_name(prediction_type))
    return {"unet": _count(unet), "text_encoders": sum(_count(e) for e in encoders), "vae": _count(vae)}


def adapter_parameters(family: str, network) -> int:
    """Trainable parameters of the adapter the config's network section describes, on the real model: the
    network code builds it on the meta device, so every adapter type counts its own parameters."""
    unet, encoders, _ = _meta_models(get_family(family).shipped_config_name("epsilon"))
    return count_adapter_parameters(family, unet, encoders, network.spec())


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate_resources(cfg: TrainConfig, family: str, prediction_type: str = "epsilon") -> Estimate:
    """GPU memory and seconds per optimizer step; the formula is documented in docs/PREFLIGHT.md."""
    train, resolution = cfg.train, cfg.dataset.resolution
    params = {**model_parameters(family, prediction_type), "adapter": adapter_parameters(family, cfg.network)}
    half = train.mixed_precision in ("fp16", "bf16")
    activation = ACTIVATION_BYTES_PER_PIXEL[family] * (1 if half else 2) * resolution ** 2 * train.batch_size
    if train.gradient_checkpointing:
        activation *= CHECKPOINTING_ACTIVATIONS
    memory = {"weights": (params["unet"] + params["text_encoders"]) * WEIGHT_BYTES[train.mixed_precision],
              "vae": params["vae"] * 4,  # sdlora keeps the VAE in fp32 (SDXL's overflows in fp16)
              "adapter": params["adapter"] * (8 + OPTIMIZER_FACTS[train.optimizer][0]),
              "activations": activation, "overhead": OVERHEAD_BYTES}
    memory["total"] = sum(memory.values())
    flop = (SD15_FLOP_PER_IMAGE * FLOP_PER_PIXEL_FACTOR[family] * resolution ** 2 / 512 ** 2
            * train.batch_size * train.gradient_accumulation_steps)
    if train.gradient_checkpointing:
        flop *= CHECKPOINTING_COMPUTE
    seconds = flop / ASSUMED_THROUGHPUT["half" if half else "fp32"]
    return Estimate(family, resolution, train.batch_size, train.mixed_precision if half else "fp32",
                    train.gradient_checkpointing, params, memory, seconds)


def explain_estimate(ctx: CheckContext) -> None:
    """The estimate in words, the run's duration on a GPU, and what a machine without one means."""
    if ctx.family is None:
        return
    cfg, report = ctx.cfg, ctx.report
    try:
        estimate = estimate_resources(cfg, ctx.family, ctx.prediction)
    except SdloraError as error:  # a network the trainer would refuse too (e.g. every block at weight 0)
        report.errors.append(str(error))
        return
    report.data["estimate"] = asdict(estimate)
    demo = f"For a full-size {ctx.family} model (the demo model is tiny): " if ctx.is_demo else ""
    report.info.append(demo + estimate.words())
    steps = report.data.get("steps", {}).get("total_steps")
    if steps:
        report.info.append(f"At that rate the {steps} steps take {_duration(steps * estimate.seconds_per_step)} "
                           "on a GPU (uncalibrated).")
    if not torch.cuda.is_available():
        # No CPU formula: a CPU's speed on this work varies too much to guess; the run measures it instead.
        tiny = "the tiny demo model trains in minutes, " if ctx.is_demo else ""
        precision = (f" (in fp32: train.mixed_precision {cfg.train.mixed_precision} applies on a GPU only)"
                     if cfg.train.mixed_precision != "no" else "")
        report.info.append(f"No CUDA GPU here: training runs on the CPU{precision}, where {tiny}a full-size model "
                           "trains hundreds of times slower than on a GPU; the live view shows the measured rate and "
                           "ETA from the first steps.")


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"about {seconds:.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"
