"""Module names in the kohya key layout that A1111/Forge, ComfyUI, diffusers and LyCORIS all read.

`<prefix><diffusers module path with '.' -> '_'>`, with two twists (docs/LORA_FORMAT.md):
- text encoders always carry exactly one `text_model_` (transformers >= 5 flattens CLIPTextModel);
- the SDXL UNet uses the SGM (original Stability) block names, the only ones every loader maps fully.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import SdloraError

if TYPE_CHECKING:  # torch-free at run time: block_lr.py and so the config read these names
    from torch import nn

# kohya's module-name prefixes, by the short part names inspect and analysis print (model order).
UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"  # SD1/SD2's one text encoder (and what some trainers write for SDXL's first)
TE1_PREFIX, TE2_PREFIX = "lora_te1_", "lora_te2_"  # SDXL's two text encoders
PREFIXES = {"unet": UNET_PREFIX, "te": TE_PREFIX, "te1": TE1_PREFIX, "te2": TE2_PREFIX}
TEXT_ENCODER_PREFIXES = (TE_PREFIX, TE1_PREFIX, TE2_PREFIX)
SD_PREFIXES = (UNET_PREFIX, TE_PREFIX)  # what SD1 and SD2 files use
SDXL_PREFIXES = (UNET_PREFIX, TE1_PREFIX, TE2_PREFIX)
FAMILY_PREFIXES = {"sd1": SD_PREFIXES, "sd2": SD_PREFIXES, "sdxl": SDXL_PREFIXES}  # spec.FAMILIES, in order
# The heads of a UNet name after its prefix: SDXL's SGM (original Stability) blocks and diffusers' blocks
SGM_HEADS = ("input_blocks_", "middle_block_", "output_blocks_", "out_2", "time_embed_", "label_emb_")
DIFFUSERS_HEADS = ("down_blocks_", "mid_block_", "up_blocks_", "conv_in", "conv_out", "time_embedding_")


def prefix_of(name: str) -> str | None:
    """The kohya prefix a module name or file key starts with ("lora_te1_"), None for a foreign name."""
    return next((prefix for prefix in PREFIXES.values() if name.startswith(prefix)), None)


def role_of(name: str) -> str | None:
    """Which part a module name or file key belongs to: "unet", "te", "te1" or "te2"; None for a foreign
    name."""
    return next((role for role, prefix in PREFIXES.items() if name.startswith(prefix)), None)


def is_text_encoder_name(name: str) -> bool:
    return name.startswith(TEXT_ENCODER_PREFIXES)


@dataclass
class Component:
    """One model part that gets adapters: the UNet or a text encoder."""

    role: str  # "unet", "text_encoder", "text_encoder_2": the attribute name in a diffusers pipeline
    model: nn.Module
    prefix: str  # one of PREFIXES
    sgm_names: bool = False  # SDXL UNet only

    @property
    def is_unet(self) -> bool:
        return self.role == "unet"


def components_for(family: str, unet: nn.Module | None, text_encoders: list[nn.Module]) -> list[Component]:
    """The per-family component list; a None/empty part is left out (UNet-only or TE-only networks)."""
    if family not in FAMILY_PREFIXES:
        raise SdloraError(f"Unknown model family '{family}'; use one of {', '.join(FAMILY_PREFIXES)}.")
    parts: list[Component] = []
    if unet is not None:
        parts.append(Component("unet", unet, UNET_PREFIX, sgm_names=family == "sdxl"))
    if family == "sdxl":
        prefixes = [("text_encoder", TE1_PREFIX), ("text_encoder_2", TE2_PREFIX)]
    else:
        prefixes = [("text_encoder", TE_PREFIX)]
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
    if component.prefix == TE1_PREFIX:
        names |= {n.replace(TE1_PREFIX, TE_PREFIX, 1) for n in list(names)}
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
