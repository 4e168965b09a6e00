"""The user's model architecture built from its configs on the meta device, placed as the trainer places it.

Building from the configs costs under a second for SDXL (faster than copying a cached one), so every
prediction builds its own and may cast, hook and checkpoint it freely."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch.overrides import TorchFunctionMode

from networks.lora_file import DTYPES
from trainer.config import TrainConfig
from trainer.model.family import ModelFamily
from trainer.model.fp8 import store_fp8
from trainer.model.model_loading import text_encoder_classes

META = torch.device("meta")


@dataclass
class MetaModel:
    family: ModelFamily
    unet: torch.nn.Module
    text_encoders: list
    vae: torch.nn.Module
    noise_scheduler: DDPMScheduler
    weight_dtype: torch.dtype
    source: str = ""  # the config folder it was built from: with the dtype, what its text states' shapes depend on


def weight_dtype(cfg: TrainConfig) -> torch.dtype:
    """The trainer's weight dtype (as trainer/run/build.py picks it): a half-precision run casts the frozen UNet
    and text encoders to it; the VAE and the adapters stay fp32."""
    return DTYPES.get(cfg.train.mixed_precision, torch.float32)  # "no": fp32


# What modules' reset_parameters and adapters' inits call to write values; a meta tensor has none to write.
_INITIALISERS = frozenset({torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_, torch.Tensor.fill_,
                           torch.Tensor.exponential_, torch.Tensor.random_})


class _NoValuesOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INITIALISERS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextmanager
def on_meta():
    """New tensors on the meta device, their initialisers skipped: the meta kernels of uniform_ and the like
    are Python and cost seconds across SDXL's and its adapters' thousands of weights, for values that do not
    exist."""
    with torch.device(META), _NoValuesOnMeta():
        yield


def meta_components(folder: Path, family: ModelFamily) -> tuple[torch.nn.Module, list, torch.nn.Module]:
    """The UNet, text encoders and VAE of a diffusers config folder, on the meta device: shapes, no memory."""
    with on_meta():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [cls(cls.config_class.from_pretrained(folder / attr))
                    for cls, attr in zip(text_encoder_classes(folder, family), family.text_encoder_attrs)]
    return unet, encoders, vae


def build_meta_model(folder: Path, family: ModelFamily, prediction_type: str, cfg: TrainConfig) -> MetaModel:
    """The model as `_load_model` (trainer/run/build.py) leaves it: frozen, the UNet and text encoders in the
    weight dtype (fp8 storage with model.fp8_base), the VAE in fp32, gradient checkpointing as configured."""
    unet, encoders, vae = meta_components(folder, family)
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler"),
                                          prediction_type=prediction_type, clip_sample=False)
    dtype = weight_dtype(cfg)
    for part in [unet, *encoders]:
        part.requires_grad_(False).eval()
        if dtype != torch.float32:  # diffusers warns on any dtype `.to()`, even a no-op one
            part.to(dtype=dtype)
    vae.requires_grad_(False).eval()
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.network.train_text_encoder:
            for encoder in encoders:
                encoder.gradient_checkpointing_enable()
    if cfg.model.fp8_base:  # after the last dtype cast, as trainer/run/build.py stores it
        for part in [unet, *([] if cfg.network.train_text_encoder else encoders)]:
            store_fp8(part, dtype)
    return MetaModel(family, unet, encoders, vae, scheduler, dtype, str(folder))
