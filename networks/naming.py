"""Module names in the kohya key layout that A1111/Forge, ComfyUI, diffusers and LyCORIS all read.

`<prefix><diffusers module path with '.' -> '_'>`, with two twists (docs/LORA_FORMAT.md):
- text encoders always carry exactly one `text_model_` (transformers >= 5 flattens CLIPTextModel);
- the SDXL UNet uses the SGM (original Stability) block names, the only ones every loader maps fully.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import SdloraError
from .spec import FAMILIES


@dataclass
class Component:
    """One model part that gets adapters: the UNet or a text encoder."""

    role: str  # "unet", "text_encoder", "text_encoder_2": the attribute name in a diffusers pipeline
    model: nn.Module
    prefix: str  # "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"
    sgm_names: bool = False  # SDXL UNet only

    @property
    def is_unet(self) -> bool:
        return self.role == "unet"


def components_for(family: str, unet: nn.Module | None, text_encoders: list[nn.Module]) -> list[Component]:
    """The per-family component list; a None/empty part is left out (UNet-only or TE-only networks)."""
    if family not in FAMILIES:
        raise SdloraError(f"Unknown model family '{family}'; use one of {', '.join(FAMILIES)}.")
    parts: list[Component] = []
    if unet is not None:
        parts.append(Component("unet", unet, "lora_unet_", sgm_names=family == "sdxl"))
    if family == "sdxl":
        prefixes = [("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")]
    else:
        prefixes = [("text_encoder", "lora_te_")]
    for (role, prefix), encoder in zip(prefixes, text_encoders):
        if encoder is not None:
            parts.append(Component(role, encoder, prefix))
    return parts


def kohya_name(component: Component, module_path: str) -> str:
    """The file name of one adapted module, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    path = module_path
    if component.is_unet:
        if component.sgm_names:
            path = to_sgm_path(module_path, component.model.config)
    elif not path.startswith("text_model."):
        path = "text_model." + path
    return component.prefix + path.replace(".", "_")


def alias_names(component: Component, module_path: str) -> list[str]:
    """Other spellings of the same module that other trainers write (accepted when loading)."""
    names = {kohya_name(component, module_path)}
    plain = module_path.removeprefix("text_model.")
    names.add(component.prefix + plain.replace(".", "_"))
    if component.is_unet and component.sgm_names:
        names.add(component.prefix + module_path.replace(".", "_"))  # diffusers-style SDXL names
    if component.prefix == "lora_te1_":
        names |= {n.replace("lora_te1_", "lora_te_", 1) for n in list(names)}
    return sorted(names)


_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}


def _resnet_inner(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return _RESNET_PARTS.get(head, head) + ("." + tail if tail else "")


def to_sgm_path(path: str, unet_config) -> str:
    """Map a diffusers UNet module path to the SGM layout (the table in docs/LORA_FORMAT.md)."""
    per_block = unet_config.layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_block + j
        return f"input_blocks.{index}.0.{_resnet_inner(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)$", path)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet_inner(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if m:
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + j
        return f"output_blocks.{index}.0.{_resnet_inner(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)$", path)
    if m:
        block = int(m[1])
        has_attention = "CrossAttn" in unet_config.up_block_types[block]
        return f"output_blocks.{block * per_block + per_block - 1}.{2 if has_attention else 1}.conv{m[2]}"
    simple = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2"}
    return simple.get(path, path)
