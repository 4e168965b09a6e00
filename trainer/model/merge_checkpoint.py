"""Bake LoRA(s) into a base model: W += weight * (alpha / r) * up @ down, saved as a new model.

Each file is loaded with networks' own loader (so a file made for another model fails with its message),
merged at its weight, and the model saved as a diffusers folder and/or one original-layout .safetensors
checkpoint (trainer.model.single_file). Weights are merged in fp32 and cast only when saving.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from networks.analysis import check_lora_keys
from networks.atomic import atomic_folder, atomic_write
from networks.errors import SdloraError
from networks.lora_file import read_lora
from networks.network import LoraNetwork
from trainer.model.model_loading import LoadedModel, load_model
from trainer.model.single_file import save_single_file

LoraSource = tuple[dict[str, torch.Tensor], float, str]  # (kohya state dict, weight, name for messages)


@dataclass
class MergeResult:
    family: str
    merged: dict[str, int] = field(default_factory=dict)  # file -> modules merged into the model
    folder: Path | None = None
    single_file: Path | None = None


def merge_into_models(family: str, unet: nn.Module, text_encoders: list[nn.Module],
                      loras: list[LoraSource]) -> dict[str, int]:
    """Add every LoRA's update, times its weight, to the given modules' weights in place.

    All files are validated against the model before the first weight changes, so a wrong file leaves
    the model untouched. The adapters are never hooked in: merging alone changes the base weights.
    """
    networks = [(LoraNetwork.from_state_dict(family, unet, text_encoders, state, source), weight, source)
                for state, weight, source in loras]
    merged = {}
    for network, weight, source in networks:
        network.set_multiplier(weight)
        network.merge()
        merged[source] = len(network.adapters)
    return merged


def read_sources(paths: list[str | os.PathLike], weights: list[float] | None) -> list[LoraSource]:
    weights = list(weights) if weights else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise SdloraError(f"Got {len(weights)} weight(s) for {len(paths)} LoRA file(s); give one weight per file.")
    if not paths:
        raise SdloraError("Give at least one LoRA file to merge.")
    sources = [(read_lora(path)[0], float(weight), str(path)) for path, weight in zip(paths, weights)]
    for state, _, source in sources:
        check_lora_keys(state, source)  # a checkpoint given as a LoRA: say so, not "modules don't match"
    return sources


def merge_checkpoint(model: str, paths: list[str | os.PathLike], weights: list[float] | None = None,
                     output_dir: str | os.PathLike | None = None, single_file: str | os.PathLike | None = None,
                     family: str = "auto", dtype: torch.dtype = torch.float32,
                     config_dir: str | os.PathLike | None = None) -> MergeResult:
    """Load `model` (a diffusers folder, a single file or demo:<family>), merge the LoRAs, save; returns
    what was merged and where. At least one of output_dir / single_file must be given."""
    if output_dir is None and single_file is None:
        raise SdloraError("Give an output folder or a single-file path for the merged model.")
    _check_free(output_dir, single_file)
    sources = read_sources(paths, weights)
    loaded = load_model(model, family=family, dtype=torch.float32, config_dir=config_dir)
    result = MergeResult(loaded.family.name)
    result.merged = merge_into_models(loaded.family.name, loaded.unet, loaded.text_encoders, sources)
    _cast(loaded, dtype)
    note = json.dumps({"base": str(model), "loras": [[src, w] for _, w, src in sources]})
    if output_dir is not None:
        result.folder = save_folder(loaded, Path(output_dir))
    if single_file is not None:
        target = Path(single_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: save_single_file(components(loaded), tmp, metadata={"sdlora_merged": note}))
        result.single_file = target
    return result


def components(loaded: LoadedModel) -> dict[str, nn.Module]:
    parts = {"unet": loaded.unet, "vae": loaded.vae}
    parts.update(zip(loaded.family.text_encoder_attrs, loaded.text_encoders))
    return parts


def save_folder(loaded: LoadedModel, target: Path) -> Path:
    """A diffusers folder written beside `target` and renamed into place, so no half folder is left behind."""
    def write(staging: Path) -> None:
        loaded.pipeline().save_pretrained(staging, safe_serialization=True)
        if target.is_dir():
            target.rmdir()  # empty, checked before the merge

    return atomic_folder(target, write)


def _check_free(output_dir, single_file) -> None:
    if output_dir is not None and Path(output_dir).exists():
        if not Path(output_dir).is_dir() or any(Path(output_dir).iterdir()):
            raise SdloraError(f"The output {output_dir} already exists and is not empty; choose a new folder.")
    if single_file is not None:
        if Path(single_file).suffix.lower() != ".safetensors":
            raise SdloraError(f"The single-file output {single_file} must end in .safetensors.")
        if Path(single_file).exists():
            raise SdloraError(f"The file {single_file} already exists; choose a new name or delete it first.")


def _cast(loaded: LoadedModel, dtype: torch.dtype) -> None:
    if dtype != torch.float32:
        for module in components(loaded).values():
            module.to(dtype)
